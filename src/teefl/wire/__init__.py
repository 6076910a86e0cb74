"""What travels between parties: the payload codec, chunk assembly, compression, the checks an
update passes, bounded parsing of peer input, the round config and the proto."""
