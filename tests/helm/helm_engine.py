"""Drive the real Helm engine (helm-sdkpy, Helm 4's Go library) for tests/tests/helm.rs.

Run with the venv's python; prints one JSON document on stdout.

  helm_engine.py lint CHART [--values FILE]
      `helm lint`. With --values, the chart is linted as the subchart of a scratch umbrella chart
      whose values.yaml nests FILE under the chart's name: helm-sdkpy's Lint takes no values, and
      this way Helm itself parses FILE, coalesces it over the chart's defaults, validates it
      against values.schema.json and renders every template with it.
      -> {"messages": [{"severity": 1|2|3, "path": "..."}]}
      (helm-sdkpy serialises a lint message's error as {}, so the text is lost; see `install` for
      a render error's text.)

  helm_engine.py install CHART [--values FILE] [--set-json JSON] [--upgrade]
                            [--upgrade-set-json JSON] [--fail-job NAME]...
      `helm install` (and with --upgrade, then `helm upgrade`, with the same values unless
      --upgrade-set-json gives others) of release "platform" in namespace "soma-ns", against the
      in-memory API server of fake_kube.py. Jobs named by --fail-job fail.
      -> {"install": STEP, "upgrade": STEP}, STEP = {"ok", "error", "events", "hooks"}:
      events are the objects Helm created, updated and deleted, in order, as the JSON Helm sent;
      hooks are the hooks of the release as Helm classified them (events, weight, policies).

  helm_engine.py examples CHART EXAMPLES_DIR
      Renders, through a scratch umbrella chart with values EXAMPLES_DIR/soma-backup.yaml, the
      named templates "soma-backup.agentContainer", "soma-backup.agentPodLabels",
      "soma-backup.agentPodAnnotations" and "soma-backup.agentVolumes" for both engines, and reads
      every EXAMPLES_DIR/*.yaml with Helm's own YAML parser.
      -> {"rendered": {"postgres": {...}, "qdrant": {...}}, "files": {"NAME.yaml": {...}}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helm_sdkpy  # noqa: E402

from fake_kube import FakeKube  # noqa: E402

RELEASE = "platform"
NAMESPACE = "soma-ns"


def chart_name(chart: Path) -> str:
    for line in (chart / "Chart.yaml").read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip().strip("\"'")
    raise SystemExit(f"{chart}/Chart.yaml has no name")


def umbrella(tmp: Path, chart: Path, values_file: Path | None, extra_templates=None) -> Path:
    """A parent chart with CHART as its only dependency (in charts/), and FILE nested under it."""
    name = chart_name(chart)
    root = tmp / "umbrella"
    (root / "charts").mkdir(parents=True)
    (root / "templates").mkdir()
    shutil.copytree(chart, root / "charts" / name)
    (root / "Chart.yaml").write_text(
        "apiVersion: v2\n"
        "name: umbrella\n"
        "description: Scratch parent chart of the soma-backup tests\n"
        "version: 0.1.0\n"
        "icon: https://example.invalid/icon.svg\n"
        "dependencies:\n"
        f"  - name: {name}\n"
        "    version: \">=0.0.0-0\"\n"
    )
    values = ""
    if values_file is not None:
        indented = "".join(
            f"  {line}" if line.strip() else line
            for line in values_file.read_text().splitlines(keepends=True)
        )
        values = f"{name}:\n{indented}\n"
    (root / "values.yaml").write_text(values or "{}\n")
    for rel, text in (extra_templates or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def lint(chart: Path, values_file: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        target = chart if values_file is None else umbrella(Path(tmp), chart, values_file)
        config = helm_sdkpy.Configuration(namespace=NAMESPACE)
        result = asyncio.run(helm_sdkpy.Lint(config).run(str(target)))
    messages = [{"severity": m.get("Severity"), "path": m.get("Path")}
                for m in (result.get("Messages") or [])]
    return {"messages": messages}


def hooks_of(release) -> list:
    if not isinstance(release, dict):
        return []
    return [
        {
            "name": h.get("name"),
            "kind": h.get("kind"),
            "path": h.get("path"),
            "events": h.get("events") or [],
            "weight": h.get("weight", 0),
            "delete_policies": h.get("delete_policies") or [],
        }
        for h in (release.get("hooks") or [])
    ]


def run_step(kube: FakeKube, action, chart: str, values: dict) -> dict:
    start = len(kube.events)
    try:
        release = asyncio.run(action.run(RELEASE, chart, values=values or None, wait=False,
                                         timeout=60))
        ok, error = True, None
    except helm_sdkpy.HelmError as e:
        release, ok, error = None, False, str(e)
    return {"ok": ok, "error": error, "events": kube.events[start:], "hooks": hooks_of(release)}


def install(chart: Path, values_file: Path | None, values: dict, upgrade: bool,
            upgrade_values: dict | None, fail_jobs: list[str]) -> dict:
    kube = FakeKube(fail_jobs=set(fail_jobs)).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            target = chart
            if upgrade_values is None:
                upgrade_values = values
            if values_file is not None:
                target = umbrella(Path(tmp), chart, values_file)
                values = {chart_name(chart): values} if values else {}
                upgrade_values = {chart_name(chart): upgrade_values} if upgrade_values else {}
            config = helm_sdkpy.Configuration(namespace=NAMESPACE,
                                              kubeconfig=kube.kubeconfig(NAMESPACE))
            out = {"install": run_step(kube, helm_sdkpy.Install(config), str(target), values)}
            if upgrade and out["install"]["ok"]:
                out["upgrade"] = run_step(kube, helm_sdkpy.Upgrade(config), str(target),
                                          upgrade_values)
    finally:
        kube.stop()
    return out


EXAMPLES_TEMPLATE = """\
{{- $soma := index .Values "%(name)s" }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-examples
data:
  {{- range $engine := list "postgres" "qdrant" }}
  {{- $args := dict "engine" $engine "Values" $soma }}
  {{ $engine }}.container.json: {{ include "soma-backup.agentContainer" $args | fromYamlArray | toJson | quote }}
  {{ $engine }}.labels.json: {{ include "soma-backup.agentPodLabels" $args | fromYaml | toJson | quote }}
  {{ $engine }}.annotations.json: {{ include "soma-backup.agentPodAnnotations" $args | fromYaml | toJson | quote }}
  {{ $engine }}.volumes.json: {{ include "soma-backup.agentVolumes" $args | fromYamlArray | toJson | quote }}
  {{- end }}
  {{- range $path, $_ := .Files.Glob "examples/*.yaml" }}
  file.{{ base $path }}: {{ $.Files.Get $path | fromYaml | toJson | quote }}
  {{- end }}
"""


def examples(chart: Path, examples_dir: Path) -> dict:
    name = chart_name(chart)
    kube = FakeKube().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = umbrella(Path(tmp), chart, examples_dir / "soma-backup.yaml",
                            {"templates/examples.yaml": EXAMPLES_TEMPLATE % {"name": name}})
            (root / "examples").mkdir()
            for f in sorted(examples_dir.glob("*.yaml")):
                shutil.copy(f, root / "examples" / f.name)
            config = helm_sdkpy.Configuration(namespace=NAMESPACE,
                                              kubeconfig=kube.kubeconfig(NAMESPACE))
            step = run_step(kube, helm_sdkpy.Install(config), str(root), {})
    finally:
        kube.stop()
    if not step["ok"]:
        return {"error": step["error"]}
    data = next(e["object"]["data"] for e in step["events"]
                if e["kind"] == "ConfigMap" and e["name"] == "rendered-examples")
    rendered: dict = {}
    files = {}
    for key, text in data.items():
        if key.startswith("file."):
            files[key[len("file."):]] = json.loads(text)
        else:
            engine, part, _ = key.split(".")
            rendered.setdefault(engine, {})[part] = json.loads(text)
    return {"rendered": rendered, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("lint")
    p.add_argument("chart", type=Path)
    p.add_argument("--values", type=Path)
    p = sub.add_parser("install")
    p.add_argument("chart", type=Path)
    p.add_argument("--values", type=Path)
    p.add_argument("--set-json", default="{}")
    p.add_argument("--upgrade", action="store_true")
    p.add_argument("--upgrade-set-json")
    p.add_argument("--fail-job", action="append", default=[])
    p = sub.add_parser("examples")
    p.add_argument("chart", type=Path)
    p.add_argument("examples_dir", type=Path)
    args = parser.parse_args()

    # Helm must not read or write this user's Helm configuration, cache or kubeconfig.
    with tempfile.TemporaryDirectory() as home:
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            os.environ[var] = os.path.join(home, var.lower())
        os.environ["KUBECONFIG"] = os.path.join(home, "no-kubeconfig")
        if args.cmd == "lint":
            out = lint(args.chart, args.values)
        elif args.cmd == "install":
            out = install(args.chart, args.values, json.loads(args.set_json), args.upgrade,
                          json.loads(args.upgrade_set_json) if args.upgrade_set_json else None,
                          args.fail_job)
        else:
            out = examples(args.chart, args.examples_dir)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
