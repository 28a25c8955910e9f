"""Generated gRPC stubs of proto/herd/v1/herd.proto (`make proto` regenerates them; a test checks
they are current)."""
