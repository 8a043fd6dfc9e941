#!/usr/bin/env python3
"""Container health check for crescent services (docker-compose `healthcheck`; Kubernetes uses native probes).

    crescent-healthcheck grpc 127.0.0.1:50051     # grpc.health.v1: exit 0 only when SERVING
    crescent-healthcheck http http://127.0.0.1:8000/health   # exit 0 only on HTTP 200

Exit status 0 healthy, 1 unhealthy, 2 bad usage. Standard library plus grpcio, both in the image.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def grpc_serving(address: str, timeout_s: float = TIMEOUT_S) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"unhealthy: {address}: {e.code().name}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return False
    return True


def http_ok(url: str, timeout_s: float = TIMEOUT_S) -> bool:
    # No proxies: the check targets the container itself.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, target = argv
    healthy = grpc_serving(target) if kind == "grpc" else http_ok(target)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
