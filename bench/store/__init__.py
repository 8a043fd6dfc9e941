"""kvstore benchmarks: transports against a raw loopback socket, the SSD tier against a plain file read."""
