"""One module per process role (design §4): supervisor, capture, worker."""
