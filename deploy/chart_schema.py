"""Generate helm/crescent/values.schema.json (checked in; a test fails when it is stale).

Regenerate: ``.venv/bin/python deploy/chart_schema.py``.

Written as Python rather than by hand because the five roles share most keys: each role's schema is spelled out
in full (no allOf/unevaluatedProperties) so Helm's validator reports a typo as "additional properties 'x' not
allowed" at the exact path, instead of an opaque "false schema".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "crescent" / "values.schema.json"
ROLES = ("gateway", "conductor", "prefill", "decode", "kvstore")

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], description: str = "", required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        out["description"] = description
    if required:
        out["required"] = list(required)
    return out


def integer(description: str, minimum: int = 0, maximum: int | None = None) -> Schema:
    out: Schema = {"type": "integer", "minimum": minimum, "description": description}
    if maximum is not None:
        out["maximum"] = maximum
    return out


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


PORT: Schema = {"$ref": "#/$defs/port"}
QUANTITY: Schema = {"$ref": "#/$defs/quantity"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
DEFS: Schema = {
    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "A TCP port (1-65535)."},
    "quantity": {
        "description": "A Kubernetes quantity such as 500m, 2, 4Gi.",
        "anyOf": [{"type": "number", "minimum": 0},
                  {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"}],
    },
}


def resources() -> Schema:
    quantities = {"type": "object", "additionalProperties": QUANTITY}
    return obj({"requests": quantities, "limits": quantities}, "Container resources (requests/limits).")


def settings() -> Schema:
    return {
        "type": "object",
        "description": "Service settings by field name (ttft_slo_s -> env CRESCENT_TTFT_SLO_S).",
        "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$"},
        "additionalProperties": {"type": ["string", "number", "integer", "boolean", "array", "object"]},
    }


def env() -> Schema:
    entry = {"type": "object", "required": ["name"],
             "properties": {"name": string("Variable name.", pattern="^[A-Za-z_][A-Za-z0-9_]*$")}}
    return {"type": "array", "items": entry, "description": "Extra raw env entries (value or valueFrom)."}


def pdb() -> Schema:
    either = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+%$"}]}
    return obj({"enabled": {"type": "boolean"}, "maxUnavailable": either, "minAvailable": either},
               "PodDisruptionBudget (maxUnavailable, or minAvailable which wins when set).")


def image(required: tuple[str, ...] = ()) -> Schema:
    return obj({"repository": string("Image repository.", minLength=1),
                "tag": {"type": ["string", "number"], "description": "Image tag (empty: the chart's appVersion)."},
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, "Container image.", required)


def autoscaler(with_server: bool) -> Schema:
    props: dict[str, Schema] = {
        "enabled": {"type": "boolean"},
        "minReplicas": integer("Fewest replicas.", 1),
        "maxReplicas": integer("Most replicas.", 1),
        "targetWaitingPerPod": {"type": "number", "exclusiveMinimum": 0,
                                "description": "Waiting requests per pod to scale at."},
    }
    if with_server:
        props["serverAddress"] = string("Prometheus URL KEDA queries.", pattern="^https?://")
    return obj(props)


def secret_ref(description: str, default_key: str) -> Schema:
    return obj({"existingSecret": string(f"{description} Empty: unused."),
                "key": string(f"Key in the Secret (default {default_key}).", minLength=1)})


def peers(description: str) -> Schema:
    return {"type": "array", "items": {"type": "object"}, "description": description}


def gateway_exposure() -> dict[str, Schema]:
    path = obj({"path": string("URL path.", pattern="^/"),
                "pathType": {"enum": ["Prefix", "Exact", "ImplementationSpecific"]}}, required=("path", "pathType"))
    host = obj({"host": string("Host name."), "paths": {"type": "array", "minItems": 1, "items": path}},
               required=("host", "paths"))
    return {
        "apiKey": secret_ref("Secret holding the API key clients send as Bearer token.", "api-key"),
        "ingress": obj({"enabled": {"type": "boolean"}, "className": {"type": "string"},
                        "annotations": STRING_MAP, "hosts": {"type": "array", "items": host},
                        "tls": {"type": "array", "items": {"type": "object"}}}, "An Ingress for the gateway."),
        "httpRoute": obj({"enabled": {"type": "boolean"}, "annotations": STRING_MAP,
                          "parentRefs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                          "hostnames": {"type": "array", "items": {"type": "string"}}},
                         "A Gateway API HTTPRoute for the gateway."),
        "autoscaling": obj({"enabled": {"type": "boolean"},
                            "minReplicas": integer("Fewest replicas.", 1),
                            "maxReplicas": integer("Most replicas.", 1),
                            "targetCPUUtilizationPercentage": integer("CPU use to scale at (% of the request).", 1),
                            "targetInFlightPerPod": {"type": "number", "minimum": 0,
                                                     "description": "Requests in flight per pod to scale at (0: off)."}},
                           "HorizontalPodAutoscaler for the gateway."),
    }


def component(role: str) -> Schema:
    props: dict[str, Schema] = {
        "replicas": integer("Pods of this role.", 1 if role in ("gateway", "conductor") else 0),
        "port": PORT,
        "resources": resources(),
        "settings": settings(),
        "env": env(),
        "nodeSelector": STRING_MAP,
        "tolerations": {"type": "array", "items": {"type": "object"}},
        "affinity": {"type": "object"},
        "podAnnotations": STRING_MAP,
        "terminationGracePeriodSeconds": integer("Seconds to drain before the kill."),
        "pdb": pdb(),
    }
    if role != "gateway":
        props["metricsPort"] = PORT
    if role == "gateway":
        props["service"] = obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "annotations": STRING_MAP})
        props.update(gateway_exposure())
    if role == "conductor":
        props["costModel"] = string("The cost model JSON `crescent calibrate` measured on the workers' hardware "
                                    "(--set-file conductor.costModel=FILE); empty: the built-in estimate.")
        props["redisUrl"] = string("An existing Redis for shared state.", pattern="^(|rediss?://.+)$")
        props["redisUrlSecret"] = obj({"name": string("Secret name (empty: unused)."),
                                       "key": string("Key holding the URL.", minLength=1)})
        props["redisPasswordSecret"] = obj({"name": string("Secret holding an existing Redis' password (empty: "
                                                           "none, or the URL's)."),
                                            "key": string("Key holding the password.", minLength=1)})
        props["redisTls"] = obj({"enabled": {"type": "boolean", "description": "TLS to an existing Redis."},
                                 "caSecret": string("Secret whose ca.crt signed the Redis server's certificate "
                                                    "(empty: the image's system CAs).")},
                                "TLS to an existing Redis.")
    if role in ("prefill", "decode"):
        props["gpus"] = integer("GPUs per pod (nvidia.com/gpu); > 0 also sets device=cuda.")
        props["image"] = image()
        props["startupFailureThreshold"] = integer("Startup probes (5 s apart) allowed for model loading.", 1)
        props["autoscaling"] = autoscaler(with_server=False)
        props["keda"] = autoscaler(with_server=True)
    if role == "kvstore":
        props["dataPort"] = PORT
        props["transport"] = {"enum": ["tcp", "mooncake"], "description": "Bulk data transport."}
        props["dramCapacityBytes"] = integer("DRAM tier capacity in bytes.", 1)
        props["ssdCapacityBytes"] = integer("SSD tier capacity in bytes (0: no SSD tier).")
        props["dataDir"] = string("Where the SSD tier lives in the pod.", pattern="^/")
        props["persistence"] = obj({
            "enabled": {"type": "boolean"}, "size": QUANTITY, "storageClassName": {"type": "string"},
            "accessModes": {"type": "array", "minItems": 1,
                            "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]}}})
    return obj(props, f"The {role} role.")


def model() -> Schema:
    return obj({
        "source": {"enum": ["image", "pvc", "hostPath", "huggingface"],
                   "description": "Where the model folders come from."},
        "name": string("'default' or a folder under mountPath.", pattern=r"^(default|[A-Za-z0-9._-][A-Za-z0-9._/-]*)$"),
        "servedName": {"type": "string"},
        "mountPath": string("Where the model volume is mounted.", pattern="^/"),
        "pvc": obj({"existingClaim": {"type": "string"}, "create": {"type": "boolean"}, "size": QUANTITY,
                    "storageClassName": {"type": "string"},
                    "accessModes": {"type": "array", "minItems": 1,
                                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                                       "ReadWriteOncePod"]}}}),
        "hostPath": obj({"path": string("Node directory (absolute), required for source hostPath.",
                                        pattern="^(|/.*)$"),
                         "type": {"enum": ["Directory", "DirectoryOrCreate"]}}),
        "huggingface": obj({
            "id": string("Hub model id (org/name), required for source huggingface.",
                         pattern=r"^(|[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)$"),
            "revision": string("Branch, tag or commit.", minLength=1),
            "endpoint": string("The Hub's URL.", pattern="^https?://"),
            "tokenSecret": obj({"name": string("Secret with a Hub token (empty: none)."),
                                "key": string("Key holding the token.", minLength=1)}),
            "files": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                      "description": "Glob patterns of the repository files to fetch."},
            "sizeLimit": QUANTITY,
        }, "A Hugging Face Hub model, downloaded by an init container into each pod."),
    }, "The model the gateway and the workers serve.")


def build() -> Schema:
    props: dict[str, Schema] = {
        "nameOverride": {"type": "string"},
        "fullnameOverride": {"type": "string"},
        "image": {**image(required=("repository",)), "properties": {
            **image()["properties"],
            "frontRepository": string("The torch-free image (deploy/Dockerfile --target front) that gateway, "
                                      "conductor and kvstore run; empty: repository.")}},
        "imagePullSecrets": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "serviceAccount": obj({"create": {"type": "boolean"}, "name": {"type": "string"},
                               "annotations": STRING_MAP}),
        "podSecurityContext": {"type": "object"},
        "securityContext": {"type": "object"},
        "logLevel": {"enum": ["debug", "info", "warning", "error"]},
        "tmp": obj({"sizeLimit": QUANTITY}, "The /tmp emptyDir of every crescent pod."),
        "internalAuth": obj({"enabled": {"type": "boolean"},
                             "existingSecret": string("Secret holding the internal token; empty: generated."),
                             "key": string("Key holding the token.", minLength=1)},
                            "The shared token of internal gRPC and the kvstore data port."),
        "networkPolicy": obj({"enabled": {"type": "boolean"},
                              "gatewayFrom": peers("Peers allowed to reach the gateway (empty: anyone)."),
                              "metricsFrom": peers("Peers allowed to scrape metrics ports (empty: anyone).")},
                             "NetworkPolicies: only the gateway is reachable from outside the release."),
        "slo": obj({"ttftSeconds": {"type": "number", "exclusiveMinimum": 0, "description": "TTFT SLO (s)."},
                    "tbtSeconds": {"type": "number", "exclusiveMinimum": 0, "description": "TBT SLO (s)."}},
                   "Service-level objectives.", required=("ttftSeconds", "tbtSeconds")),
        "model": model(),
        "worker": obj({"engine": {"enum": ["crescent", "vllm"],
                                  "description": "The prefill and decode workers' engine: crescent's own or vLLM's "
                                                 "(AsyncLLM in-process; needs an image with vLLM: deploy/Dockerfile "
                                                 "--target worker-vllm, set as prefill.image/decode.image)."}},
                      "What the prefill and decode workers share."),
        **{role: component(role) for role in ROLES},
        "redis": obj({"enabled": {"type": "boolean"}, "image": image(), "port": PORT, "resources": resources(),
                      "auth": obj({"enabled": {"type": "boolean", "description": "Require a password (AUTH)."},
                                   "existingSecret": string("A Secret holding the password; empty: the chart "
                                                            "creates one (random, reused on upgrades)."),
                                   "key": string("Key holding the password.", minLength=1)},
                                  "The bundled Redis' password."),
                      "nodeSelector": STRING_MAP, "tolerations": {"type": "array"}, "affinity": {"type": "object"}},
                     "A bundled Redis for several conductor replicas."),
        "metrics": obj({
            "serviceMonitor": obj({"enabled": {"type": "boolean"},
                                   "interval": string("Scrape interval.", pattern="^[0-9]+(ms|s|m|h)$"),
                                   "labels": STRING_MAP}),
            "prometheusRule": obj({"enabled": {"type": "boolean"}, "labels": STRING_MAP}),
            "grafanaDashboard": obj({"enabled": {"type": "boolean"},
                                     "label": string("Label Grafana's sidecar watches.", minLength=1)}),
        }),
        "global": {"type": "object"},
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "crescent chart values",
            **obj(props), "$defs": DEFS}


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run .venv/bin/python deploy/chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
