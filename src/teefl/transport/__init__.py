"""How parties reach each other: the gRPC control plane and the socket data plane."""
