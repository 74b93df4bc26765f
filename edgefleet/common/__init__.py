"""Code shared by the agent, the orchestrator and the CLI; it imports neither torch nor SQLAlchemy."""
