"""How bytes move between parties: gRPC channels, the socket data plane (framing, admission,
server, client), the neutral types the server adapters speak and the collaborator's transport seam
(one `handle(request)`; gRPC and an in-memory mock implement it)."""
