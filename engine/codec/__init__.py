"""Codecs both programs share (pure, design §4): IPv4/TCP packets, sequence arithmetic, the
intercept wire protocol, BPF, pcap files, link layers.  Imports only ``engine.errors``."""
