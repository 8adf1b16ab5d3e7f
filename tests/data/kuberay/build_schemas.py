"""Write the reduced KubeRay CRD schemas in this folder (see README.md for what was reduced and why).

Run: .venv/bin/python tests/data/kuberay/build_schemas.py — the JSON files are committed; this
script documents how they were made and rebuilds them after a KubeRay field change.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

# Kubernetes resource.Quantity, exactly as controller-gen writes it into the KubeRay CRDs.
QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
    "x-kubernetes-int-or-string": True,
}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT32 = {"type": "integer", "format": "int32"}
STR_MAP = {"type": "object", "additionalProperties": STR}
OBJ = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def strict(properties: dict, required: list[str] | None = None) -> dict:
    """A ray.io type: unknown fields rejected (the API server would silently prune them)."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def core(properties: dict, required: list[str] | None = None) -> dict:
    """A Kubernetes core type, reduced to the fields DermaFlux manifests use; others pass through."""
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


RESOURCES = core({"limits": {"type": "object", "additionalProperties": QUANTITY},
                  "requests": {"type": "object", "additionalProperties": QUANTITY}})
ENV_VAR = core({"name": STR, "value": STR, "valueFrom": OBJ}, ["name"])
CONTAINER = core(
    {
        "name": STR, "image": STR, "imagePullPolicy": STR,
        "command": {"type": "array", "items": STR}, "args": {"type": "array", "items": STR},
        "env": {"type": "array", "items": ENV_VAR},
        "envFrom": {"type": "array", "items": OBJ},
        "ports": {"type": "array", "items": core({"containerPort": INT32, "name": STR, "protocol": STR}, ["containerPort"])},
        "resources": RESOURCES,
        "volumeMounts": {"type": "array", "items": core({"mountPath": STR, "name": STR, "readOnly": BOOL}, ["mountPath", "name"])},
        "lifecycle": OBJ, "readinessProbe": OBJ, "livenessProbe": OBJ, "securityContext": OBJ,
    },
    ["name"],
)
POD_TEMPLATE = core(
    {
        "metadata": core({"labels": STR_MAP, "annotations": STR_MAP, "name": STR}),
        "spec": core(
            {
                "containers": {"type": "array", "items": CONTAINER},
                "initContainers": {"type": "array", "items": CONTAINER},
                "volumes": {"type": "array", "items": core({"name": STR}, ["name"])},
                "nodeSelector": STR_MAP,
                "tolerations": {"type": "array", "items": OBJ},
                "affinity": OBJ,
                "serviceAccountName": STR,
                "restartPolicy": STR,
            },
            ["containers"],
        ),
    }
)
SERVICE = OBJ

AUTOSCALER_OPTIONS = strict(
    {
        "resources": RESOURCES, "image": STR, "imagePullPolicy": STR,
        "env": {"type": "array", "items": ENV_VAR}, "envFrom": {"type": "array", "items": OBJ},
        "volumeMounts": {"type": "array", "items": OBJ}, "securityContext": OBJ,
        "idleTimeoutSeconds": INT32,
        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
    }
)
HEAD_GROUP = strict(
    {"serviceType": STR, "headService": SERVICE, "enableIngress": BOOL, "rayStartParams": STR_MAP, "template": POD_TEMPLATE},
    ["rayStartParams", "template"],
)
WORKER_GROUP = strict(
    {
        "groupName": STR,
        "replicas": {**INT32, "default": 0},
        "minReplicas": {**INT32, "default": 0},
        "maxReplicas": {**INT32, "default": 2147483647},
        "numOfHosts": {**INT32, "default": 1},
        "rayStartParams": STR_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": strict({"workersToDelete": {"type": "array", "items": STR},
                                 "multihostReplicasToDelete": {"type": "array", "items": STR}}),
    },
    ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
)
RAY_CLUSTER_SPEC = strict(
    {
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "rayVersion": STR,
        "enableInTreeAutoscaling": BOOL,
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STR_MAP,
        "suspend": BOOL,
    },
    ["headGroupSpec"],
)
METADATA = core({"name": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP}, ["name"])


def resource(kind: str, spec: dict) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} (ray.io/v1), reduced openAPIV3Schema",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
            "status": OBJ,
        },
        "additionalProperties": False,
    }


DELETION_POLICY = strict({"policy": {"type": "string", "enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]}}, ["policy"])
RAY_JOB_SPEC = strict(
    {
        "activeDeadlineSeconds": INT32,
        "backoffLimit": {**INT32, "default": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STR_MAP,
        "clusterSelector": STR_MAP,
        "submitterConfig": strict({"backoffLimit": INT32}),
        "managedBy": {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": strict({"onSuccess": DELETION_POLICY, "onFailure": DELETION_POLICY}, ["onSuccess", "onFailure"]),
        "entrypoint": STR,
        "runtimeEnvYAML": STR,
        "jobId": STR,
        "submissionMode": {"type": "string", "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"], "default": "K8sJobMode"},
        "entrypointResources": STR,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": {**INT32, "default": 0},
        "shutdownAfterJobFinishes": BOOL,
        "suspend": BOOL,
        "schedule": STR,
    }
)
RAY_SERVICE_SPEC = strict(
    {
        "serveConfigV2": STR,
        "rayClusterConfig": RAY_CLUSTER_SPEC,
        "serviceUnhealthySecondThreshold": INT32,
        "deploymentUnhealthySecondThreshold": INT32,
        "serveService": SERVICE,
    }
)

SCHEMAS = {
    "raycluster.schema.json": resource("RayCluster", RAY_CLUSTER_SPEC),
    "rayjob.schema.json": resource("RayJob", RAY_JOB_SPEC),
    "rayservice.schema.json": resource("RayService", RAY_SERVICE_SPEC),
}

if __name__ == "__main__":
    for name, schema in SCHEMAS.items():
        (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(HERE / name)
