"""Generated gRPC and protobuf code for the edgefleet.v1 API. Regenerate with `make protos`."""
