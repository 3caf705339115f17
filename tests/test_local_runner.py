"""The local runner on small hand-written workflows: order, parameters, volumes, retries, refusals."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.errors import BadInput
from pipelines.local_runner import LocalRunner

WRITE = "import pathlib,sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
STAMP = (
    "import pathlib,sys,time; pathlib.Path(sys.argv[1]).write_text(str(time.time())); time.sleep(float(sys.argv[2]))"
)


def container(name: str, code: str, args: list[str], **extra: Any) -> dict[str, Any]:
    tmpl: dict[str, Any] = {
        "name": name,
        "container": {
            "image": "x",
            "command": ["python", "-c", code],
            "args": args,
            "volumeMounts": [{"name": "work", "mountPath": "/work"}],
        },
    }
    tmpl.update(extra)
    return tmpl


def workflow(templates: list[dict[str, Any]], tasks: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": "t-"},
        "spec": {
            "entrypoint": "main",
            "arguments": {"parameters": [{"name": "greeting", "value": "hi"}]},
            "volumeClaimTemplates": [{"metadata": {"name": "work"}}],
            "templates": [*templates, {"name": "main", "dag": {"tasks": tasks}}],
            **spec,
        },
    }


def run(doc: dict[str, Any], tmp_path: Path, **kwargs: Any) -> Any:
    return LocalRunner(doc, tmp_path / "run", base_dir=tmp_path, backoff_scale=0.0, **kwargs).run()


def test_parameters_outputs_and_volumes_flow_between_tasks(tmp_path: Path) -> None:
    producer = container(
        "produce",
        WRITE,
        ["/tmp/out/word", "{{workflow.parameters.greeting}}-there"],
        outputs={"parameters": [{"name": "word", "valueFrom": {"path": "/tmp/out/word"}}]},
    )
    consumer = container(
        "consume", WRITE, ["/work/result.txt", "{{inputs.parameters.word}}!"], inputs={"parameters": [{"name": "word"}]}
    )
    doc = workflow(
        [producer, consumer],
        [
            {"name": "a", "template": "produce"},
            {
                "name": "b",
                "template": "consume",
                "depends": "a",
                "arguments": {"parameters": [{"name": "word", "value": "{{tasks.a.outputs.parameters.word}}"}]},
            },
        ],
    )
    result = run(doc, tmp_path, overrides={"greeting": "hello"})
    assert result.status == "Succeeded"
    assert (tmp_path / "run" / "volumes" / "work" / "result.txt").read_text() == "hello-there!"
    assert result.tasks[0].outputs == {"word": "hello-there"}


def test_independent_tasks_run_in_parallel_and_dependents_wait(tmp_path: Path) -> None:
    sleeper = container(
        "sleep", STAMP, ["/work/{{inputs.parameters.n}}", "1.0"], inputs={"parameters": [{"name": "n"}]}
    )
    doc = workflow(
        [sleeper],
        [
            {"name": "a", "template": "sleep", "arguments": {"parameters": [{"name": "n", "value": "a"}]}},
            {"name": "b", "template": "sleep", "arguments": {"parameters": [{"name": "n", "value": "b"}]}},
            {
                "name": "c",
                "template": "sleep",
                "depends": "a && b",
                "arguments": {"parameters": [{"name": "n", "value": "c"}]},
            },
        ],
    )
    result = run(doc, tmp_path)
    assert result.status == "Succeeded"
    work = tmp_path / "run" / "volumes" / "work"
    a, b, c = (float((work / n).read_text()) for n in "abc")
    assert abs(a - b) < 0.9  # started together, not one after the other
    assert c >= max(a, b) + 1.0  # started after both finished


def test_hostpath_volumes_resolve_against_the_spec_directory(tmp_path: Path) -> None:
    tmpl = container("w", WRITE, ["/data/out.txt", "x"])
    tmpl["container"]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    doc = workflow(
        [tmpl], [{"name": "a", "template": "w"}], volumes=[{"name": "data", "hostPath": {"path": "host-dir"}}]
    )
    (tmp_path / "host-dir").mkdir()
    assert run(doc, tmp_path).status == "Succeeded"
    assert (tmp_path / "host-dir" / "out.txt").read_text() == "x"


def _flaky(code: int) -> str:
    # Fails with ``code`` on the first attempt, succeeds on the second.
    return (
        "import pathlib,sys; p=pathlib.Path('/work/count'); n=int(p.read_text()) if p.exists() else 0; "
        f"p.write_text(str(n+1)); sys.exit({code} if n == 0 else 0)"
    )


RETRY = {
    "limit": 2,
    "retryPolicy": "Always",
    "expression": "asInt(lastRetry.exitCode) == 75",
    "backoff": {"duration": "1s", "factor": 2},
}


def test_transient_exit_is_retried(tmp_path: Path) -> None:
    tmpl = container("flaky", _flaky(75), [])
    tmpl["container"]["command"] = ["python", "-c", _flaky(75).replace("/work", str(tmp_path))]
    tmpl["retryStrategy"] = RETRY
    result = run(workflow([tmpl], [{"name": "a", "template": "flaky"}]), tmp_path)
    assert result.status == "Succeeded"
    assert result.tasks[0].attempts == 2


def test_bad_input_exit_is_not_retried_and_dependents_are_omitted(tmp_path: Path) -> None:
    tmpl = container("flaky", "", [])
    tmpl["container"]["command"] = ["python", "-c", _flaky(2).replace("/work", str(tmp_path))]
    tmpl["retryStrategy"] = RETRY
    marker = tmp_path / "exit-status"
    after = container("after", WRITE, ["/work/after", "ran"])
    handler = container("handler", WRITE, [str(marker), "{{workflow.status}}"])
    doc = workflow(
        [tmpl, after, handler],
        [{"name": "a", "template": "flaky"}, {"name": "b", "template": "after", "depends": "a"}],
        onExit="handler",
    )
    result = run(doc, tmp_path)
    assert result.status == "Failed"
    assert [t.status for t in result.tasks] == ["Failed", "Omitted"]
    assert result.tasks[0].attempts == 1 and result.tasks[0].exit_code == 2
    assert marker.read_text() == "Failed"  # the exit handler ran and saw the failure
    assert not (tmp_path / "run" / "volumes" / "work" / "after").exists()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["spec"]["templates"].append({"name": "s", "script": {"image": "x", "source": "print(1)"}}),
            "spec.templates[s].script",
        ),
        (
            lambda d: d["spec"]["templates"][-1]["dag"]["tasks"][0].update(withItems=[1, 2]),
            "spec.templates[main].dag.tasks[0].withItems",
        ),
        (lambda d: d["spec"].update(volumes=[{"name": "s", "secret": {"secretName": "x"}}]), "spec.volumes[0]"),
        (
            lambda d: d["spec"]["templates"][0]["container"].update(command=["bash", "-c", "true"]),
            "spec.templates[w].container.command",
        ),
        (
            lambda d: d["spec"]["templates"][0].update(retryStrategy={"expression": "lastRetry.status == 'Error'"}),
            "spec.templates[w].retryStrategy.expression",
        ),
        (lambda d: d["spec"].update(hooks={"exit": {}}), "spec.hooks"),
    ],
    ids=["script", "withItems", "secret-volume", "non-python", "retry-expression", "hooks"],
)
def test_unsupported_features_are_refused_up_front(tmp_path: Path, mutate: Any, field: str) -> None:
    doc = workflow([container("w", WRITE, ["/work/x", "y"])], [{"name": "a", "template": "w"}])
    doc = copy.deepcopy(doc)
    mutate(doc)
    with pytest.raises(BadInput) as info:
        LocalRunner(doc, tmp_path / "run", base_dir=tmp_path)
    assert any(p.path == field and "not supported by the local runner" in p.message for p in info.value.problems)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_unknown_parameter_override_is_refused(tmp_path: Path) -> None:
    doc = workflow([container("w", WRITE, ["/work/x", "y"])], [{"name": "a", "template": "w"}])
    with pytest.raises(BadInput, match="not a parameter"):
        LocalRunner(doc, tmp_path / "run", base_dir=tmp_path, overrides={"nope": "1"})


def test_progress_file_is_read(tmp_path: Path) -> None:
    code = "import os,time; open(os.environ['ARGO_PROGRESS_FILE'],'w').write('3/7'); time.sleep(0.6)"
    seen: list[str] = []
    doc = workflow([container("p", code, [])], [{"name": "a", "template": "p"}])
    runner = LocalRunner(doc, tmp_path / "run", base_dir=tmp_path, on_change=lambda t: seen.append(t.progress))
    started = time.monotonic()
    assert runner.run().status == "Succeeded"
    assert "3/7" in seen and time.monotonic() - started < 30
