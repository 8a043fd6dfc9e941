"""The restricted Pod Security Standard (Kubernetes 1.30, which includes baseline) as a check of one pod spec.

The API server's admission (pod-security.kubernetes.io/enforce: restricted) refuses pods that break these rules;
this mirrors https://kubernetes.io/docs/concepts/security/pod-security-standards/ field by field, so a rendered
chart can be checked offline. Each violation is a readable string naming the field.
"""

from __future__ import annotations

from typing import Any

Spec = dict[str, Any]

# Restricted allows only these volume types.
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}


def containers(spec: Spec) -> list[tuple[str, Spec]]:
    """(kind/name, container) for containers, init containers and ephemeral containers."""
    return [(f"{kind}[{c.get('name', '?')}]", c) for kind in ("containers", "initContainers", "ephemeralContainers")
            for c in spec.get(kind) or []]


def _host_and_volumes(spec: Spec) -> list[str]:
    out = [f"spec.{f}: must not be true" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volumes[{volume.get('name')}]: type {', '.join(sorted(kinds))} is not allowed")
    for sysctl in (spec.get("securityContext") or {}).get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    return out


def _context_rules(where: str, ctx: Spec) -> list[str]:
    """Rules that apply to the pod's and to each container's securityContext alike."""
    out = []
    if (ctx.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{where}.windowsOptions.hostProcess: must not be true")
    selinux = ctx.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        out.append(f"{where}.seLinuxOptions: custom user/role/type not allowed")
    if "seccompProfile" in ctx and (ctx["seccompProfile"] or {}).get("type") not in SECCOMP_TYPES:
        out.append(f"{where}.seccompProfile.type: must be RuntimeDefault or Localhost")
    if "appArmorProfile" in ctx and (ctx["appArmorProfile"] or {}).get("type") not in APPARMOR_TYPES:
        out.append(f"{where}.appArmorProfile.type: must be RuntimeDefault or Localhost")
    if ctx.get("runAsNonRoot") is False:
        out.append(f"{where}.runAsNonRoot: must not be false")
    if ctx.get("runAsUser") == 0:
        out.append(f"{where}.runAsUser: must not be 0")
    return out


def _container_rules(where: str, c: Spec, pod_ctx: Spec) -> list[str]:
    ctx = c.get("securityContext") or {}
    out = _context_rules(f"{where}.securityContext", ctx)
    if ctx.get("privileged"):
        out.append(f"{where}.securityContext.privileged: must not be true")
    if ctx.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
    caps = ctx.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(f"{where}.securityContext.capabilities.drop: must include ALL")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        out.append(f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE")
    if ctx.get("procMount", "Default") != "Default":
        out.append(f"{where}.securityContext.procMount: must be Default")
    if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
        out.append(f"{where}: runAsNonRoot must be true (in the pod's or the container's securityContext)")
    if "seccompProfile" not in ctx and "seccompProfile" not in pod_ctx:
        out.append(f"{where}: seccompProfile must be set (RuntimeDefault or Localhost)")
    out += [f"{where}.ports: hostPort {p['hostPort']}" for p in c.get("ports") or [] if p.get("hostPort")]
    return out


def restricted_violations(spec: Spec, annotations: dict[str, str] | None = None) -> list[str]:
    """Every way the pod spec (with its pod template's annotations) breaks the restricted profile; [] if none."""
    pod_ctx = spec.get("securityContext") or {}
    out = _host_and_volumes(spec) + _context_rules("securityContext", pod_ctx)
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value == "unconfined":
            out.append(f"annotation {key}: unconfined AppArmor")
    for where, c in containers(spec):
        out += _container_rules(where, c, pod_ctx)
    return out
