"""A small in-memory Kubernetes API server for driving the real Helm engine in tests.

Helm has no client-only render in helm-sdkpy, so the tests let the real engine install and upgrade
a release against this double and look at what it sent. It follows the Kubernetes REST wire
protocol as client-go uses it: `/version`, legacy discovery (`/api`, `/apis`, one APIResourceList
per group version), JSON objects on `POST` (create), `GET` (read, list with a label selector),
`PUT`, `PATCH` (merge and strategic-merge patches, applied as a JSON merge patch, which is exact
for the maps Helm changes) and `DELETE`. It keeps every object it was given, assigns `uid`,
`resourceVersion` and `creationTimestamp` like the API server, and records each mutating request
in order, so a test can see which objects Helm created, in which order, and with which content
(`requests` lists every request line, for debugging).

A Job is created already complete (`status.succeeded: 1`, condition `Complete`) unless its name is
listed in `fail_jobs`, in which case it is created failed (`BackoffLimitExceeded`), as the Job
controller would report after a failed pod with `backoffLimit: 0`. Helm waits for hooks with
client-go informers, which open "watch list" streams (`sendInitialEvents=true`): they get the
current objects, the bookmark that ends the initial events, then bookmarks until they hang up.

Two encodings besides JSON: Helm stores releases as Secrets through client-go's typed clientset,
which sends protobuf (decoded here for Secrets only), and client-go's validator loads the OpenAPI
v2 document as protobuf (an empty one is served, so it validates nothing).
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# (group, version, resource, kind, namespaced)
RESOURCES = [
    ("", "v1", "namespaces", "Namespace", False),
    ("", "v1", "pods", "Pod", True),
    ("", "v1", "pods/portforward", "PodPortForwardOptions", True),
    ("", "v1", "pods/log", "Pod", True),
    ("", "v1", "secrets", "Secret", True),
    ("", "v1", "configmaps", "ConfigMap", True),
    ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "services", "Service", True),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True),
    ("apps", "v1", "deployments", "Deployment", True),
    ("apps", "v1", "statefulsets", "StatefulSet", True),
    ("batch", "v1", "jobs", "Job", True),
    ("batch", "v1", "cronjobs", "CronJob", True),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    # The Prometheus Operator's CRDs, as a cluster that has it installed serves them.
    ("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True),
    ("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor", True),
    ("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule", True),
]

KUBE_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64"}


def _merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if k.startswith("$"):  # strategic-merge directives ($setElementOrder, $patch, ...)
            continue
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _proto_map_entry(buf: bytes):
    entry = dict(_proto_fields(buf))
    return entry.get(1, b"").decode(), entry.get(2, b"")


def _secret_from_protobuf(raw: bytes) -> dict:
    """Decode the Secret that client-go's typed clientset (Helm's release storage) sends.

    The body is the `k8s\0` magic and a runtime.Unknown envelope (1: TypeMeta, 2: raw) around a
    v1.Secret (1: ObjectMeta, 2: data map<string, bytes>, 3: type, 4: stringData, 5: immutable);
    ObjectMeta carries 1: name, 3: namespace, 11: labels, 12: annotations. Nothing else of a
    Secret is used by Helm.
    """
    if not raw.startswith(b"k8s\x00"):
        raise ValueError("not a Kubernetes protobuf body")
    envelope = dict(_proto_fields(raw[4:]))
    meta: dict = {}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta}
    for field, value in _proto_fields(envelope[2]):
        if field == 1:
            for mf, mv in _proto_fields(value):
                if mf == 1:
                    meta["name"] = mv.decode()
                elif mf == 3:
                    meta["namespace"] = mv.decode()
                elif mf in (11, 12):
                    k, v = _proto_map_entry(mv)
                    meta.setdefault("labels" if mf == 11 else "annotations", {})[k] = v.decode()
        elif field == 2:
            k, v = _proto_map_entry(value)
            secret.setdefault("data", {})[k] = base64.b64encode(v).decode()
        elif field == 3:
            secret["type"] = value.decode()
        elif field == 4:
            k, v = _proto_map_entry(value)
            secret.setdefault("stringData", {})[k] = v.decode()
    return secret


def _proto_bytes(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads here are all shorter than 128 bytes)."""
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


# gnostic openapi_v2.Document{swagger: "2.0", info: Info{title, version}}.
_OPENAPI_V2_EMPTY = _proto_bytes(1, b"2.0") + _proto_bytes(
    2, _proto_bytes(1, b"fake-kube") + _proto_bytes(2, KUBE_VERSION["gitVersion"].encode()))


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeKube:
    """The API server: start(), use .url, read .events, stop()."""

    def __init__(self, fail_jobs: set[str] | None = None):
        self.objects: dict[tuple, dict] = {}
        self.events: list[dict] = []
        self.requests: list[str] = []
        self.fail_jobs = set(fail_jobs or ())
        self.lock = threading.Lock()
        self._rv = 0
        self._by_path = {}
        for group, version, resource, kind, namespaced in RESOURCES:
            self._by_path[(group, version, resource)] = (kind, namespaced)
        handler = type("Handler", (_Handler,), {"kube": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, namespace: str) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: \"{self.url}\"}}}}]\n"
            "users: [{name: fake, user: {token: fake}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
            "current-context: fake\n"
        )

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, code: int, obj, content_type="application/json"):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_raw(self, code: int, body: bytes, content_type: str):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code: int, reason: str, message: str, details=None):
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure" if code >= 400 else "Success",
                "message": message,
                "reason": reason,
                "details": details or {},
                "code": code,
            },
        )

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        if "protobuf" in (self.headers.get("Content-Type") or ""):
            return _secret_from_protobuf(raw)
        return json.loads(raw)

    # -- discovery ------------------------------------------------------------------------------
    def _discovery(self, path: str) -> bool:
        groups: dict[str, list[str]] = {}
        for group, version, *_ in RESOURCES:
            groups.setdefault(group, [])
            if version not in groups[group]:
                groups[group].append(version)
        if path == "/version":
            self._send(200, KUBE_VERSION)
        elif path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            items = []
            for group, versions in groups.items():
                if not group:
                    continue
                gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
                items.append({"name": group, "versions": gvs, "preferredVersion": gvs[0]})
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": items})
        elif path == "/api/v1" or (path.startswith("/apis/") and path.count("/") == 3):
            gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
            group, version = ("", gv) if "/" not in gv else gv.split("/", 1)
            res = []
            for g, v, resource, kind, namespaced in RESOURCES:
                if (g, v) == (group, version):
                    verbs = ["create"] if "/" in resource else [
                        "create", "delete", "get", "list", "patch", "update", "watch"]
                    res.append({"name": resource, "singularName": "", "namespaced": namespaced,
                                "kind": kind, "verbs": verbs})
            if not res:
                return False
            self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                             "resources": res})
        elif path == "/openapi/v2":
            # client-go's validator (Helm builds hook manifests with validation on) loads the
            # OpenAPI v2 document as protobuf before anything else. An empty document (swagger
            # "2.0", an Info, no paths, no definitions) makes it skip schema validation of every
            # kind, as it does for kinds a server does not describe.
            self._send_raw(200, _OPENAPI_V2_EMPTY,
                           "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
        elif path.startswith("/openapi"):
            self._status(404, "NotFound", "no OpenAPI v3 document in this test double")
        else:
            return False
        return True

    # -- resources ------------------------------------------------------------------------------
    def _parse(self, path: str):
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = None
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
            ns, rest = rest[1], rest[2:]
        if not rest:
            return None
        resource, name = rest[0], (rest[1] if len(rest) > 1 else None)
        sub = rest[2] if len(rest) > 2 else None
        found = self.kube._by_path.get((group, version, resource))
        if found is None:
            return None
        return group, version, resource, found[0], ns, name, sub

    def _record(self, verb, group, version, kind, ns, name, obj):
        self.kube.events.append({
            "verb": verb,
            "apiVersion": f"{group}/{version}" if group else version,
            "kind": kind,
            "namespace": ns,
            "name": name,
            "object": copy.deepcopy(obj),
        })

    def _handle(self):
        url = urlsplit(self.path)
        self.kube.requests.append(f"{self.command} {self.path}")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if self.command == "GET" and self._discovery(url.path):
            return
        parsed = self._parse(url.path)
        if parsed is None:
            self._status(404, "NotFound",
                         f"the server could not find the requested resource ({url.path})")
            return
        group, version, resource, kind, ns, name, _sub = parsed
        api_version = f"{group}/{version}" if group else version
        if self.command == "GET" and name is None:
            with self.kube.lock:
                watch = self._list(group, version, resource, kind, ns, query)
            if watch is not None:
                self._watch(watch, kind, api_version, query)
            return
        body = self._body()  # DELETE carries DeleteOptions; read it so keep-alive stays in step
        with self.kube.lock:
            self._mutate_or_get(group, version, resource, kind, ns, name, api_version, body)

    def _mutate_or_get(self, group, version, resource, kind, ns, name, api_version, body):
        kube = self.kube
        if self.command == "POST":
            name = (body.get("metadata") or {}).get("name")
        key = (group, resource, ns, name)
        cur = kube.objects.get(key)
        if self.command == "POST":
            if cur is not None:
                self._status(409, "AlreadyExists", f'{resource} "{name}" already exists',
                             {"name": name, "kind": resource})
                return
            obj = self._admit(body, api_version, kind, ns)
            kube.objects[key] = obj
            self._record("create", group, version, kind, ns, name, obj)
            self._send(201, obj)
            return
        if cur is None:
            self._status(404, "NotFound", f'{resource} "{name}" not found',
                         {"name": name, "kind": resource})
            return
        if self.command == "GET":
            self._send(200, cur)
            return
        if self.command == "DELETE":
            del kube.objects[key]
            self._record("delete", group, version, kind, ns, name, cur)
            self._send(200, cur)
            return
        if self.command == "PUT":
            obj = self._admit(body, api_version, kind, ns, cur)
        elif self.command == "PATCH":
            obj = self._admit(_merge_patch(cur, body), api_version, kind, ns, cur)
        else:
            self._status(405, "MethodNotAllowed", self.command)
            return
        kube.objects[key] = obj
        self._record("update", group, version, kind, ns, name, obj)
        self._send(200, obj)

    def _admit(self, body, api_version, kind, ns, cur=None):
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = api_version, kind
        meta = obj.setdefault("metadata", {})
        if ns is not None:
            meta["namespace"] = ns
        meta["uid"] = (cur or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = (cur or {}).get("metadata", {}).get("creationTimestamp") or \
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta["resourceVersion"] = self.kube.next_rv()
        meta.setdefault("generation", 1)
        if kind == "Job" and cur is None:
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if meta.get("name") in self.kube.fail_jobs:
                obj["status"] = {"failed": 1, "startTime": now, "conditions": [
                    {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"},
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"}]}
            else:
                obj["status"] = {"succeeded": 1, "startTime": now, "completionTime": now,
                                 "conditions": [
                                     {"type": "SuccessCriteriaMet", "status": "True"},
                                     {"type": "Complete", "status": "True"}]}
        return obj

    def _list(self, group, version, resource, kind, ns, query):
        items = []
        for (g, r, n, _), obj in self.kube.objects.items():
            if (g, r) != (group, resource) or (ns is not None and n != ns):
                continue
            labels = obj.get("metadata", {}).get("labels") or {}
            if "labelSelector" in query and not _selector_matches(query["labelSelector"], labels):
                continue
            fs = query.get("fieldSelector", "")
            if fs.startswith("metadata.name=") and obj["metadata"]["name"] != fs.split("=", 1)[1]:
                continue
            items.append(obj)
        list_obj = {"kind": f"{kind}List", "apiVersion": f"{group}/{version}" if group else version,
                    "metadata": {"resourceVersion": str(self.kube._rv)}, "items": items}
        if query.get("watch") in ("true", "1"):
            return list_obj
        self._send(200, list_obj)
        return None

    def _watch(self, list_obj: dict, kind: str, api_version: str, query: dict):
        """A watch, as the API server serves it (called without the lock held).

        With sendInitialEvents=true (client-go's streaming "watch list"), the current objects
        come first as ADDED events, then a BOOKMARK annotated k8s.io/initial-events-end. Nothing
        changes behind a watch in these tests, so afterwards only bookmarks follow, once a
        second, until timeoutSeconds (at most 60 s) or until the client hangs up.
        """
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        rv = list_obj["metadata"]["resourceVersion"]

        def send(event):
            line = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        def bookmark(annotations=None):
            meta = {"resourceVersion": rv}
            if annotations:
                meta["annotations"] = annotations
            return {"type": "BOOKMARK",
                    "object": {"kind": kind, "apiVersion": api_version, "metadata": meta}}

        try:
            if query.get("sendInitialEvents") == "true":
                for obj in list_obj["items"]:
                    send({"type": "ADDED", "object": obj})
                send(bookmark({"k8s.io/initial-events-end": "true"}))
            deadline = time.monotonic() + min(int(query.get("timeoutSeconds", "60")), 60)
            while time.monotonic() < deadline:
                time.sleep(1)
                send(bookmark())
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
