"""The ``kaitune`` command: validate, plan, render and run a Kaito tuning Workspace."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipelines.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInput, Problem, Transient
from pipelines.finetune import render as render_workflow
from pipelines.gpus import skus_by_size
from pipelines.plan import load_and_plan, load_spec
from pipelines.plan_report import plan_table
from pipelines.presets import PRESETS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Kaito-style QLoRA/LoRA fine-tuning as an Argo Workflow.",
)
out = Console()
err = Console(stderr=True)

SpecFile = Annotated[Path, typer.Argument(help="Kaito Workspace YAML (with an optional training ConfigMap)")]
AllowLocal = Annotated[
    bool, typer.Option("--allow-local-urls", help="allow loopback/private dataset URLs (local test servers)")
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input is a clear message and exit 2, never a traceback."""
    try:
        yield
    except BadInput as exc:
        err.print(exc.render(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Transient as exc:
        err.print(f"error: {exc} (transient: try again)", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_TRANSIENT) from None


@app.command()
def validate(file: SpecFile, allow_local_urls: AllowLocal = False) -> None:
    """Check a Workspace against Kaito's admission rules and the GPU fit; list every problem."""
    with user_errors():
        spec, plan = load_and_plan(file, allow_local_urls=allow_local_urls)
    for warning in spec.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    out.print(f"{file}: valid ({spec.method} {spec.preset_name} on {plan.target})", markup=False)


@app.command()
def plan(
    file: SpecFile,
    local: Annotated[bool, typer.Option(help="plan for this machine instead")] = False,
    allow_local_urls: AllowLocal = False,
) -> None:
    """Show the model, GPUs, dtype, LoRA targets and memory estimate for a Workspace."""
    with user_errors():
        _, the_plan = load_and_plan(file, allow_local_urls=allow_local_urls, local=local)
    out.print(plan_table(the_plan))


@app.command()
def render(
    file: SpecFile,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    template: Annotated[
        bool, typer.Option("--template", help="a WorkflowTemplate (for GitOps) instead of a Workflow")
    ] = False,
    gitops: Annotated[
        Path | None, typer.Option("--gitops", help="write the GitOps bundle here (template, RBAC, ConfigMaps)")
    ] = None,
    allow_local_urls: AllowLocal = False,
) -> None:
    """Write the Argo Workflow (or WorkflowTemplate, or the whole GitOps bundle) for a Workspace as YAML."""
    with user_errors():
        spec, the_plan = load_and_plan(file, allow_local_urls=allow_local_urls)
        doc = render_workflow(spec, the_plan, kind="WorkflowTemplate" if template else "Workflow")
    if gitops is not None:
        from pipelines import gitops as bundle

        for path in bundle.write(gitops, bundle.bundle(spec, the_plan)):
            err.print(f"wrote {path}", markup=False)
        return
    text = to_yaml(doc)
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        err.print(f"wrote {output}", markup=False)


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)


@app.command()
def presets() -> None:
    """List the model presets."""
    table = Table("preset", "model", "params", "arch", "LoRA targets", "context")
    for p in PRESETS.values():
        table.add_row(
            p.name,
            p.hf_id,
            f"{p.shape.params / 1e9:.2f}B",
            p.shape.architecture,
            ",".join(p.target_modules),
            str(p.context_length),
        )
    out.print(table)


@app.command()
def skus() -> None:
    """List the GPU instance types kaitune can plan for."""
    table = Table("instance type", "cloud", "GPUs", "memory/GPU", "compute", "bf16")
    for s in skus_by_size():
        table.add_row(
            s.name,
            s.cloud,
            f"{s.count} x {s.gpu}",
            f"{s.memory_gib:g} GiB",
            str(s.compute_capability),
            "yes" if s.supports_bf16 else "no",
        )
    out.print(table)


# -- kaitune run -------------------------------------------------------------------------------------------------

_KEY_OUTPUTS = {
    "provision": ["devices"],
    "fetch-data": ["train-rows", "eval-rows", "bad-rows"],
    "train": ["eval-loss-before", "eval-loss", "tokens-per-second"],
    "push": ["digest"],
    "deploy": ["endpoint", "chat-reply"],
}
_STYLE = {"Succeeded": "green", "Failed": "red", "Running": "yellow", "Omitted": "dim", "Pending": "dim"}


@app.command()
def pull(
    reference: Annotated[
        str, typer.Argument(help="registry/repository:tag, ...@sha256:..., or oci-layout://DIR[:TAG]")
    ],
    directory: Annotated[Path, typer.Argument(help="where the image's files go (replaced whole)")],
    ca_file: Annotated[Path | None, typer.Option(help="PEM bundle that signs the registry's certificate")] = None,
    plain_http: Annotated[
        bool | None, typer.Option("--plain-http/--no-plain-http", help="default: plain HTTP only for loopback")
    ] = None,
    docker_config: Annotated[Path | None, typer.Option(help="Docker config.json with the login")] = None,
) -> None:
    """Pull an adapter (or any /data or ORAS file image), every blob checked against its digest."""
    from steps.oci.options import RegistryOptions
    from steps.oci.transfer import pull as pull_image

    with user_errors():
        result = pull_image(reference, directory, RegistryOptions(plain_http, ca_file, docker_config))
    out.print(f"{reference}: {result.digest}, {len(result.files)} file(s) in {directory}", markup=False)
    for name in result.files:
        out.print(f"  {name}", markup=False, highlight=False)


ArgoServer = Annotated[str | None, typer.Option("--argo-server", help="Argo Server URL (default: $ARGO_SERVER)")]
ArgoNamespace = Annotated[str | None, typer.Option("-n", "--namespace", help="default: $ARGO_NAMESPACE or argo")]
TokenFile = Annotated[Path | None, typer.Option(help="file holding the Argo token (default: $ARGO_TOKEN)")]
CaFile = Annotated[Path | None, typer.Option("--ca-file", help="PEM bundle that signs the Argo Server")]


def _argo(server: str | None, namespace: str | None, token_file: Path | None, ca_file: Path | None) -> Any:
    from pipelines import argo_server

    return argo_server.settings(server, namespace, token_file, ca_file)


def _print_status(wf: dict[str, Any], wide: bool) -> None:
    """kubectl-style columns: aligned, never truncated (scripts and wide terminals read them whole)."""
    from pipelines.workflow_status import row

    values = row(wf, wide=wide)
    widths = [max(len(k), len(v)) for k, v in values.items()]
    for cells in (list(values), list(values.values())):
        out.print("   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(), markup=False,
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command()
def submit(
    file: SpecFile,
    inline: Annotated[
        bool, typer.Option("--inline", help="submit the whole Workflow, not a template reference")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="follow until done; exit 1 if the workflow fails")] = False,
    apply_configmap: Annotated[
        bool, typer.Option(help="server-side apply the spec's training ConfigMap in the namespace")
    ] = True,
    argo_server: ArgoServer = None,
    namespace: ArgoNamespace = None,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """Submit the Workspace as an Argo Workflow (from the kaitune-finetune WorkflowTemplate) through hera."""
    from pipelines import submit as submitting

    with user_errors():
        spec, plan = load_and_plan(file)
        settings = _argo(argo_server, namespace, token_file, ca_file)
        if apply_configmap and spec.config_map:
            from steps import kube

            kube.apply_config_map(kube.connect(), spec.config_map, settings.namespace)
        created = submitting.submit(settings, spec, plan, use_inline=inline)
        name = created["metadata"]["name"]
        out.print(f"workflow {name} submitted in {settings.namespace}", markup=False)
        if not wait:
            return
        final = submitting.wait(settings, name, lambda wf: _print_status(wf, wide=True))
    final_status = final.get("status", {})
    if final_status.get("phase") != "Succeeded":
        err.print(f"workflow {name} {final_status.get('phase')}: {final_status.get('message', '')}", markup=False)
        raise typer.Exit(1)


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="the workflow's name")],
    output: Annotated[str, typer.Option("-o", "--output", help="wide, or json")] = "",
    argo_server: ArgoServer = None,
    namespace: ArgoNamespace = None,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """The workflow as Kaito's columns (NAME INSTANCE RESOURCEREADY INFERENCEREADY WORKSPACEREADY AGE)."""
    from pipelines import submit as submitting
    from pipelines.workflow_status import row

    with user_errors():
        wf = submitting.get(_argo(argo_server, namespace, token_file, ca_file), name)
    if output == "json":
        out.print_json(data=row(wf, wide=True))
    else:
        _print_status(wf, wide=output == "wide")


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="the workflow's name")],
    step: Annotated[str | None, typer.Option(help="only this step: provision, fetch-data, train, push, deploy")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep streaming")] = False,
    argo_server: ArgoServer = None,
    namespace: ArgoNamespace = None,
    token_file: TokenFile = None,
    ca_file: CaFile = None,
) -> None:
    """A workflow's logs, all steps or one."""
    from pipelines import argo_logs
    from pipelines import submit as submitting

    with user_errors():
        settings = _argo(argo_server, namespace, token_file, ca_file)
        pod = argo_logs.pod_for(submitting.get(settings, name), step) if step else None
        for pod_name, line in argo_logs.lines(settings, name, pod, follow):
            out.print(line if step else f"{pod_name}: {line}", markup=False, highlight=False, soft_wrap=True)


def _steps_table(tasks: list[Any], title: str, final: bool) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("step", "status", "duration", "tries" if not final else "key outputs"):
        table.add_column(column)
    if not final:
        table.add_column("progress")
    for t in tasks:
        status = f"[{_STYLE.get(t.status, '')}]{t.status}[/]"
        duration = f"{t.duration:.1f}s" if t.duration is not None else "-"
        if final:
            keys = ", ".join(f"{k}={t.outputs[k].strip()[:60]}" for k in _KEY_OUTPUTS.get(t.name, []) if k in t.outputs)
            table.add_row(t.name, status, duration, keys)
        else:
            table.add_row(t.name, status, duration, str(t.attempts or ""), t.progress)
    return table


def _parse_params(values: list[str]) -> dict[str, str]:
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(Problem(f"-p {item}", "is not KEY=VALUE", "write -p name=value"))
        params[key] = value
    return params


def _stop_server(pid_text: str) -> None:
    try:
        pid = int(pid_text)
        os.killpg(pid, signal.SIGTERM)
    except (ValueError, ProcessLookupError, PermissionError):
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@app.command()
def run(
    file: SpecFile,
    run_dir: Annotated[
        Path | None, typer.Option(help="where volumes, logs and outputs go (default: runs/WORKSPACE)")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("-p", "--param", help="override a workflow parameter, KEY=VALUE")
    ] = None,
    keep_serving: Annotated[bool, typer.Option(help="leave the inference server running at the end")] = False,
    allow_local_urls: AllowLocal = False,
) -> None:
    """Run the whole pipeline on this machine: the same Workflow that `render` writes, each step a process."""
    from pipelines.local_runner import LocalRunner, TaskRun

    with user_errors():
        spec = load_spec(file, allow_local_urls=allow_local_urls)
        _, gpu_plan = load_and_plan(file, allow_local_urls=allow_local_urls)
        _, local_plan = load_and_plan(file, allow_local_urls=allow_local_urls, local=True)
        doc = render_workflow(spec, gpu_plan)
        # Like `argo submit -p`: only parameters change for a local run, never the workflow.
        overrides = {
            "target": "local",
            "compute-dtype": local_plan.compute_dtype,
            "train-processes": "auto",  # one per local GPU; one on CPU
            "allow-local-urls": str(allow_local_urls).lower(),
            **_parse_params(param or []),
        }
        directory = (run_dir or Path("runs") / spec.name).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "workflow.yaml").write_text(to_yaml(doc))
        tasks: list[TaskRun] = []
        interactive = err.is_terminal

        def on_change(task: TaskRun) -> None:
            if task not in tasks:
                tasks.append(task)
            # Progress updates re-announce a running task; only report real state changes.
            announce = task.status != "Pending" and (task.status != "Running" or task.progress == "")
            if not interactive and announce:
                err.print(
                    f"{time.strftime('%H:%M:%S')} {task.name}: {task.status.lower()}"
                    + (f" in {task.duration:.1f}s" if task.status != "Running" and task.duration else ""),
                    markup=False,
                    highlight=False,
                )

        runner = LocalRunner(doc, directory, base_dir=spec.source_dir, overrides=overrides, on_change=on_change)
        err.print(f"kaitune run: {spec.name} ({spec.method} {spec.preset_name}) in {directory}", markup=False)
        if interactive:
            with Live(_steps_table(tasks, spec.name, False), console=err, refresh_per_second=4) as live:
                result = _run_with_view(runner.run, lambda: live.update(_steps_table(tasks, spec.name, False)))
        else:
            result = runner.run()
    all_tasks = [*result.tasks, *([result.exit_task] if result.exit_task else [])]
    err.print(_steps_table(all_tasks, f"{spec.name}: {result.status}", True))
    deploy = next((t for t in result.tasks if t.name == "deploy"), None)
    if result.status != "Succeeded":
        if deploy and "server-pid" in deploy.outputs:
            _stop_server(deploy.outputs["server-pid"])
        failed = result.failed()[0] if result.failed() else None
        if failed and failed.log_path and failed.log_path.exists():
            tail = failed.log_path.read_text().splitlines()[-15:]
            err.print(f"--- {failed.name} log ({failed.log_path}) ---", markup=False)
            err.print("\n".join(tail), markup=False, highlight=False)
        code = failed.exit_code if failed and failed.exit_code in (EXIT_BAD_INPUT, 75) else 1
        raise typer.Exit(code)
    if deploy:
        if keep_serving:
            out.print(
                f"serving at {deploy.outputs['endpoint']} (pid {deploy.outputs['server-pid']}); try:", markup=False
            )
        else:
            _stop_server(deploy.outputs["server-pid"])
            out.print("the server was stopped (use --keep-serving to leave it up); with it up, try:", markup=False)
        out.print(deploy.outputs["curl"], markup=False, highlight=False, soft_wrap=True)


def _run_with_view(run: Callable[[], Any], refresh: Callable[[], None]) -> Any:
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        refresh()
        thread.join(0.25)
    refresh()
    if "error" in box:
        raise box["error"]
    return box["result"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
