"""The on-device daemon. It must never import torch, SQLAlchemy or edgefleet.orchestrator."""
