"""What the marked tests and the load scripts both need: deploying a serve config, free ports
and waiting for HTTP, server processes, fault scenarios, bad inputs, the two-node cluster.

tests/ import load/ only through this package; nothing here imports tests/.
"""
