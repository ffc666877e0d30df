"""Where the shared reference data lives: ``../shared/data`` beside the checkout (CI clones
the project with ``shared/`` next to it); ``TCPCOPY_SHARED_DATA`` overrides."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TCPCOPY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
ONLINE_HTTP_PCAP = SHARED_DATA / "online-http.pcap"
TARGET_SIDE_PCAP = SHARED_DATA / "target-side.pcap"
CONTROL_PCAP = SHARED_DATA / "control-36524.pcap"
