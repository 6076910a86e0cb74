"""The aggregator as composed parts: identity, rounds, intake, upload, publish, checkpointer,
service.

`teefl.server.aggregator.Aggregator` wires them; the transports (`teefl.transport`) call the
transport-neutral `service.Service`.
"""
