"""Request handlers as plain functions of (request, state); the servicers only adapt gRPC to them."""
