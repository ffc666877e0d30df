"""intercept-mp's packet sources: NFQUEUE and pcap.  Each pushes the packets it reads into a
callback it is given; none imports the server."""
