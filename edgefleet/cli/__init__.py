"""The operator CLI, edgefleet. It talks to the orchestrator's OperatorService only."""
