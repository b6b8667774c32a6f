"""The Open Inference Protocol gRPC stubs (tritonclient's), for Serve's gRPC proxy and replicas.

`grpc_options.grpc_servicer_functions` in the serve configs names
`add_GRPCInferenceServiceServicer_to_server` here rather than in tritonclient: tritonclient
generated grpc_service.proto under the bare module names `grpc_service_pb2` and
`model_config_pb2`, so its messages claim to live there, and Serve's proxy pickles each
request message for the replica. Importing this module (the proxy does, through the config;
the Ingress does, through deployments/oip.py) makes those names importable, so a message
pickles in one process and unpickles in the other.
"""

from __future__ import annotations

import sys

from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)
sys.modules.setdefault("model_config_pb2", model_config_pb2)

add_GRPCInferenceServiceServicer_to_server = (
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
)

__all__ = ["add_GRPCInferenceServiceServicer_to_server", "service_pb2"]
