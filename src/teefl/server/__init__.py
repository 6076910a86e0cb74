"""The aggregator as composed parts: identity, rounds, model (the strategy seam), intake, upload,
receivers, publish, replay, checkpointer and the transport-neutral service.

`teefl.server.aggregator.Aggregator` wires them; `grpc_adapter` and `socket_adapter` carry the
`service.Service` over `teefl.transport`.
"""
