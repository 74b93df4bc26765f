"""Transport security, enrollment, operator tokens and artifact signing of the orchestrator."""
