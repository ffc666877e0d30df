"""Test fixtures both the test suite and the benchmarks use: the network-namespace testbed.

Not part of the installed programs (pyproject.toml does not ship it): like a library's
``test_utils`` module, it is imported from a checkout by tests/netns, bench/ and the demo.

- ``testbed.netns``: namespaces, veth links, routes, nginx/redis targets, the two programs
  started in their namespaces, and their logs collected when something fails;
- ``testbed.loadgen``, ``testbed.impair``, ``testbed.synflood``: the programs it runs inside
  the namespaces (``python -m testbed.loadgen ...``): bounded HTTP load, NFQUEUE loss/delay,
  a bounded SYN flood.
"""
