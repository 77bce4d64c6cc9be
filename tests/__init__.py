"""Platform test suite.

In-process servers and clients start gRPC core as the platform's processes do
(``platform_common.grpc_setup``): this package is imported before any test module or
conftest, so before anything imports grpc."""

from platform_common import grpc_setup

grpc_setup.apply()
