"""Profile -> SGLang command line and environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentserve.cli import main as cli_main
from agentserve.server.launcher import build_plan
from agentserve.profile import load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_demo_plan() -> None:
    plan = build_plan(load_profile(REPO / "profiles" / "cpu-demo.yaml"), port=31234)
    a = plan.argv
    assert a[1:3] == ["-m", "sglang.launch_server"]
    assert flag(a, "--port") == "31234" and flag(a, "--host") == "127.0.0.1"
    assert flag(a, "--attention-backend") == "torch_native" and flag(a, "--device") == "cpu"
    assert flag(a, "--tool-call-parser") == "hermes" and flag(a, "--dtype") == "bfloat16"
    assert "--speculative-algorithm" not in a and "--enable-metrics" in a
    assert plan.env["SGLANG_USE_CPU_ENGINE"] == "1" and plan.env["SGLANG_TOOL_STRICT_LEVEL"] == "2"
    assert plan.env["SGLANG_NATIVE_MOVE_KV_CACHE"] == "1"
    assert json.loads(Path(plan.env["AGENTSERVE_PROFILE"]).read_text())["name"] == "cpu-demo"
    # no real sgl_kernel on this machine: the stand-in is put on the path for the CPU server
    assert "shim" in plan.env.get("PYTHONPATH", "")


def test_speculative_and_gpu_plans() -> None:
    spark = build_plan(load_profile(REPO / "profiles" / "cpu-dspark.yaml"))
    assert flag(spark.argv, "--speculative-algorithm") == "AGENTSPARK"
    assert flag(spark.argv, "--speculative-num-draft-tokens") == "16" and "--disable-overlap-schedule" in spark.argv
    assert json.loads(Path(spark.env["AGENTSERVE_PROFILE"]).read_text())["drafter"]["path"].endswith("drafters/smollm2-135m-dspark-corpus")
    # radix drafting walks the radix tree, which only the Python tree core exposes
    assert spark.env["SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"] == "python"
    prof = load_profile(REPO / "profiles" / "cpu-dspark.yaml")
    no_tree = prof.model_copy(update={"drafter": prof.drafter.model_copy(update={"radix_tree": False})})
    assert "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND" not in build_plan(no_tree).env
    gpu = build_plan(parse_profile({"name": "g", "model": {"path": "/m"}, "server": {"device": "cuda", "extra_args": ["--tp", "2"]}}))
    assert "SGLANG_USE_CPU_ENGINE" not in gpu.env and "PYTHONPATH" not in gpu.env
    assert "--attention-backend" not in gpu.argv and gpu.argv[-2:] == ["--tp", "2"]
    # upstream DSPARK on a GPU, on the same checkpoint (the GPU baseline of `agentserve bench`)
    up = build_plan(parse_profile({"name": "u", "model": {"path": "/m"}, "server": {"device": "cuda"},
                                   "drafter": {"algorithm": "dspark", "path": "/d", "num_draft_tokens": 8}}))
    assert flag(up.argv, "--speculative-algorithm") == "DSPARK" and flag(up.argv, "--speculative-draft-model-path") == "/d"
    assert flag(up.argv, "--speculative-dspark-block-size") == "7" and "--disable-overlap-schedule" not in up.argv


def test_dry_run_prints_command(capsys) -> None:
    assert cli_main(["launch", "--profile", str(REPO / "profiles" / "cpu-demo.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sglang.launch_server" in out and "export SGLANG_USE_CPU_ENGINE=1" in out


def test_dry_run_prints_a_command_that_serves_the_same_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The bug: --dry-run left out the variable carrying the profile, so its command served no
    # tiers and no drafter. Every exported variable must be printed, and the profile file it
    # names must be the profile launched (port override included).
    import shlex

    from agentserve.cli import main
    from sglang_ext import config

    monkeypatch.setenv("AGENTSERVE_CACHE", str(tmp_path))
    src = REPO / "profiles" / "cpu-dspark.yaml"
    assert main(["launch", "--profile", str(src), "--port", "31999", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    env = dict(shlex.split(ln[len("export "):])[0].split("=", 1) for ln in lines if ln.startswith("export "))
    assert set(env) >= {"AGENTSERVE_PROFILE", "SGLANG_USE_CPU_ENGINE"}
    argv = shlex.split(lines[-1])
    assert argv[argv.index("--port") + 1] == "31999"
    monkeypatch.setenv(config.ENV, env["AGENTSERVE_PROFILE"])
    config.reset()
    try:
        served = config.served()
    finally:
        config.reset()
    want = load_profile(src)
    assert served.server.port == 31999
    assert served.interactivity_tiers == want.interactivity_tiers and served.interactivity_tiers
    assert served.drafter == want.drafter and served.drafter.algorithm == "agentspark"


def test_served_profile_falls_back_when_the_cache_is_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # AGENTSERVE_CACHE names a path that cannot be a directory (a file is in the way): the
    # launch must still get a served profile, with a warning naming the variable.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("AGENTSERVE_CACHE", str(blocker))
    plan = build_plan(load_profile(REPO / "profiles" / "cpu-demo.yaml"), port=31235)
    served = Path(plan.env["AGENTSERVE_PROFILE"])
    assert served.is_file() and not served.is_relative_to(blocker)
    assert json.loads(served.read_text())["server"]["port"] == 31235
    assert "AGENTSERVE_CACHE" in capsys.readouterr().err


def test_drain_guard_refuses_new_work_only_while_draining() -> None:
    import asyncio

    from agentserve.server.drain import DrainGuard

    draining = [False]
    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])

    async def call(method: str, path: str) -> list[dict]:
        sent: list[dict] = []

        async def send(msg: dict) -> None:
            sent.append(msg)

        await DrainGuard(app, lambda: draining[0])({"type": "http", "method": method, "path": path}, None, send)
        return sent

    assert asyncio.run(call("POST", "/v1/chat/completions")) == [] and reached == ["/v1/chat/completions"]
    draining[0] = True
    start, body = asyncio.run(call("POST", "/v1/chat/completions"))
    assert start["status"] == 503 and (b"retry-after", b"10") in start["headers"]
    assert json.loads(body["body"])["param"] == "server"
    assert asyncio.run(call("POST", "/agentserve/v1/sessions"))[0]["status"] == 503
    # reads, metrics and session closes still pass while draining
    for method, path in (("GET", "/metrics"), ("GET", "/agentserve/v1/agents"), ("DELETE", "/agentserve/v1/sessions/s")):
        assert asyncio.run(call(method, path)) == []
    assert reached[1:] == ["/metrics", "/agentserve/v1/agents", "/agentserve/v1/sessions/s"]


def test_exact_mode_is_ours_on_a_cpu_and_sglangs_on_a_gpu() -> None:
    def plan(device: str) -> list[str]:
        return build_plan(parse_profile({"name": "x", "model": {"path": "/m"},
                                         "server": {"device": device, "deterministic": True}})).argv

    assert "--enable-deterministic-inference" not in plan("cpu")  # the plugin's row-invariant products
    assert "--enable-deterministic-inference" in plan("cuda")
    with pytest.raises(Exception, match="deterministic"):
        parse_profile({"name": "x", "model": {"path": "/m"}, "server": {"deterministic": "sometimes"}})
