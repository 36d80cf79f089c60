"""Self-distilled drafter corpus: prompts from a broad pool, answered by the target through the
real SGLang server, stored as token ids in append-only gzip JSONL shards.

    agentserve corpus build --out corpus/ --target-tokens 500000    # resumable, SIGTERM-safe
    agentserve corpus stats --out corpus/

Second turns of MT-Bench follow the target's own greedy answer to the first turn, once that is in
the corpus (`followup_prompts`).  Every prompt is answered twice: greedy (T=0) and sampled (T in {0.7, 0.85, 1.0}, picked by a
hash of the prompt key), each request carrying a pinned ``sampling_seed`` derived from the
corpus seed and the key.  The held-out split is fixed by a hash of the prompt key (``is_eval``,
10 %): eval prompts are answered too (they are what held-out tau is measured on) but training
never reads them.  Each run appends one new shard; a record is one gzip member, so a run killed
mid-write loses at most its last record, and readers skip a torn tail.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import signal
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS_DIR = "/work/shared/data/prompts"
DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
DEFAULT_PROFILE = REPO / "profiles" / "cpu-demo.yaml"
SERVED_TEMPLATE = REPO / "agentserve" / "templates" / "chatml_tools.jinja"
DEFAULT_CFB = Path.home() / ".cache" / "agentserve" / "sources" / "nestful_wrapper-0.1.7-py3-none-any.whl"
CFB_MEMBER = "data_v1/complexfuncbench/complexfuncbench-data.json"
CFB_SPEC_MEMBER = "data_v1/complexfuncbench/complexfuncbench-spec.json"
SHARED_SETS = {"gsm8k": "gsm8k.jsonl", "humaneval": "humaneval.jsonl", "mbpp": "mbpp.jsonl", "mt-bench": "mt-bench.jsonl"}
DOMAIN_OF = {"gsm8k": "math", "humaneval": "code", "mbpp": "code", "mt-bench": "chat", "cfb": "agent"}
SAMPLED_TEMPERATURES = (0.7, 0.85, 1.0)
EVAL_EVERY = 10  # 1 in 10 prompt keys is held out


def is_eval(prompt_key: str) -> bool:
    """The fixed held-out rule: crc32 of the prompt key % 10 == 0 (same rule as data.is_heldout)."""
    return zlib.crc32(prompt_key.encode()) % EVAL_EVERY == 0


def _h(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") & ((1 << 62) - 1)


@dataclass
class CorpusPrompt:
    key: str  # stable id of the prompt (split is decided on it)
    src: str
    messages: list[dict[str, Any]]
    tools: Optional[list[dict[str, Any]]] = None


@dataclass
class Job:
    prompt: CorpusPrompt
    variant: str  # "greedy" | "sampled"
    temperature: float
    seed: int
    ids: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- prompt sources
def _shared_lines(prompts_dir: str) -> Iterator[tuple[str, str, list[Any]]]:
    """(source, prompt key, turns) of every line of the shared prompt sets present."""
    for src, fn in SHARED_SETS.items():
        path = os.path.join(prompts_dir, fn)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    # key spelled as data.load_prompts does, so both modules agree on the split
                    yield src, f"{fn}:{i}", json.loads(line)["turns"]


def shared_prompts(prompts_dir: str) -> list[CorpusPrompt]:
    return [CorpusPrompt(key, src, [{"role": "user", "content": str(turns[0])}])
            for src, key, turns in _shared_lines(prompts_dir)]


def followup_prompts(prompts_dir: str, out_dir: str | Path, decode: Any) -> list[CorpusPrompt]:
    """Second turns of the multi-turn shared sets (MT-Bench): the first question, the target's own
    greedy answer to it from the corpus (`decode` turns its ids into text), the follow-up. Only
    conversations whose first turn is answered; same key, so the same split as that turn."""
    answers = {r["key"]: r for r in iter_records(out_dir) if r["key"].endswith("/t1#greedy")}
    out: list[CorpusPrompt] = []
    for src, key, turns in _shared_lines(prompts_dir):
        first = answers.get(f"{key}/t1#greedy")
        if len(turns) < 2 or first is None:
            continue
        reply = decode(first["ids"][first["prompt_len"]:])
        out.append(CorpusPrompt(key, src, [{"role": "user", "content": str(turns[0])},
                                           {"role": "assistant", "content": reply},
                                           {"role": "user", "content": str(turns[1])}]))
    return out


def _cfb_tool(spec: dict[str, Any]) -> dict[str, Any]:
    props, req = {}, []
    for name, p in (spec.get("query_parameters") or {}).items():
        props[name] = {"type": p.get("type") or "string", "description": p.get("description") or ""}
        if p.get("enum"):
            props[name]["enum"] = p["enum"]
        if p.get("required"):
            req.append(name)
    return {"type": "function", "function": {"name": spec["name"], "description": spec.get("description") or "",
                                             "parameters": {"type": "object", "properties": props, "required": req}}}


def cfb_prompts(source: Optional[Path], response_chars: int = 700) -> list[CorpusPrompt]:
    """ComplexFuncBench conversations from the nestful-wrapper wheel (Apache-2.0): for each item a
    first turn with its tools, and a mid-trajectory turn (first call made, its response shown)."""
    if source is None or not source.exists():
        return []
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            data = json.loads(z.read(CFB_MEMBER))
            specs = json.loads(z.read(CFB_SPEC_MEMBER))
    else:
        data = json.loads((source / "complexfuncbench-data.json").read_text())
        specs = json.loads((source / "complexfuncbench-spec.json").read_text())
    tools_by_name = {s["name"]: _cfb_tool(s) for s in specs}
    out: list[CorpusPrompt] = []
    for i, item in enumerate(data):
        calls = item.get("output") or []
        names = list(dict.fromkeys(c["name"] for c in calls if c.get("name") in tools_by_name))
        tools = [tools_by_name[n] for n in names] or None
        user = {"role": "user", "content": str(item["input"]).strip()}
        out.append(CorpusPrompt(f"cfb:{i}", "cfb", [user], tools))
        if calls and tools:
            c = calls[0]
            resp = json.dumps(c.get("response"))[:response_chars]
            call = {"id": "call_0", "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments") or {})}}
            msgs = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_0", "name": c["name"], "content": resp}]
            # same split as the first turn: the conversation, not the turn, is held out
            out.append(CorpusPrompt(f"cfb:{i}", "cfb", msgs, tools))
    return out


def prompt_pool(prompts_dir: str, cfb: Optional[Path]) -> list[CorpusPrompt]:
    """All prompts, interleaved by source in a fixed order so any prefix of the plan is balanced."""
    by_src: dict[str, list[CorpusPrompt]] = {}
    for p in shared_prompts(prompts_dir) + cfb_prompts(cfb):
        by_src.setdefault(p.src, []).append(p)
    for lst in by_src.values():
        lst.sort(key=lambda p: _h(p.key + str(p.messages[-1].get("role"))))
    out: list[CorpusPrompt] = []
    srcs = sorted(by_src)
    for i in range(max((len(v) for v in by_src.values()), default=0)):
        for s in srcs:
            if i < len(by_src[s]):
                out.append(by_src[s][i])
    return out


def turn_of(p: CorpusPrompt) -> str:
    """'t1' for a first turn, 't2' for one after an assistant turn (a tool result, a follow-up)."""
    return "t2" if any(m.get("role") == "assistant" for m in p.messages) else "t1"


def plan_jobs(prompts: list[CorpusPrompt], seed: int) -> list[Job]:
    jobs: list[Job] = []
    for p in prompts:
        base = f"{p.key}/{turn_of(p)}"
        t = SAMPLED_TEMPERATURES[_h(base + str(seed)) % len(SAMPLED_TEMPERATURES)]
        jobs.append(Job(p, "greedy", 0.0, _h(f"{seed}:{base}:greedy")))
        jobs.append(Job(p, "sampled", t, _h(f"{seed}:{base}:sampled")))
    return jobs


def job_key(job: Job) -> str:
    return f"{job.prompt.key}/{turn_of(job.prompt)}#{job.variant}"


# ----------------------------------------------------------------------------- shards
def iter_records(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete record of every shard, oldest shard first (a torn tail is skipped)."""
    for path in sorted(Path(out_dir, "shards").glob("shard-*.jsonl.gz")):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        break
        except (EOFError, OSError, zlib.error):
            continue  # torn last member of a killed run: its complete records were yielded


def load_corpus(out_dir: str | Path, split: Optional[str] = None) -> list[dict[str, Any]]:
    """Records {key, src, domain, split, variant, temperature, seed, prompt_len, ids}."""
    seen: set[str] = set()
    out = []
    for r in iter_records(out_dir):
        if r["key"] in seen:
            continue
        seen.add(r["key"])  # the first record of a key wins, whatever split is asked for
        if split is None or r["split"] == split:
            out.append(r)
    return out


class ShardWriter:
    """One new append-only shard per run; each record is its own gzip member, flushed."""

    def __init__(self, out_dir: Path) -> None:
        d = out_dir / "shards"
        d.mkdir(parents=True, exist_ok=True)
        n = len(list(d.glob("shard-*.jsonl.gz")))
        self.path = d / f"shard-{n:04d}.jsonl.gz"
        self._f = open(self.path, "ab")
        self.count = 0

    def write(self, rec: dict[str, Any]) -> None:
        self._f.write(gzip.compress((json.dumps(rec, separators=(",", ":")) + "\n").encode(), mtime=0))
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        self._f.close()
        if self.count == 0:
            self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- manifest
def corpus_stats(out_dir: str | Path) -> dict[str, Any]:
    st: dict[str, Any] = {"records": 0, "answer_tokens": 0, "prompt_tokens": 0, "by_src": {}, "by_split": {}}
    for r in load_corpus(out_dir):
        n_ans = len(r["ids"]) - r["prompt_len"]
        st["records"] += 1
        st["answer_tokens"] += n_ans
        st["prompt_tokens"] += r["prompt_len"]
        for k, v in (("by_src", r["src"]), ("by_split", r["split"])):
            d = st[k].setdefault(v, {"records": 0, "answer_tokens": 0})
            d["records"] += 1
            d["answer_tokens"] += n_ans
    return st


def write_manifest(out_dir: Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    man = {"format": "agentserve-corpus/1", "settings": settings, "split_rule":
           "crc32(prompt key) % 10 == 0 -> eval (never trained on); else train", "runs": runs,
           "generation_seconds": sum(r.get("seconds", 0.0) for r in runs), **corpus_stats(out_dir)}
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(man, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / "manifest.json")
    return man


# ----------------------------------------------------------------------------- build
def _encode(tok: Any, template: str, p: CorpusPrompt) -> list[int]:
    ids = tok.apply_chat_template(p.messages, tools=p.tools, chat_template=template,
                                  add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(x) for x in ids]


def _generate(url: str, job: Job, max_new_tokens: int, timeout: float) -> dict[str, Any]:
    import requests

    sp: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": job.temperature,
                          "sampling_seed": job.seed}
    if job.temperature > 0:
        sp["top_p"] = 1.0
    r = requests.post(url + "/generate", json={"input_ids": job.ids, "sampling_params": sp}, timeout=timeout)
    r.raise_for_status()
    return r.json()


def build(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: finishing in-flight requests, then stopping", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tok = AutoTokenizer.from_pretrained(args.model)
    template = SERVED_TEMPLATE.read_text()
    cfb = Path(args.cfb) if args.cfb else None
    prompts = prompt_pool(args.prompts_dir, cfb)
    prompts += followup_prompts(args.prompts_dir, out_dir, lambda ids: tok.decode(ids, skip_special_tokens=True))
    if args.sources:
        want = {x.strip() for x in args.sources.split(",") if x.strip()}
        known = set(DOMAIN_OF)
        if not want or want - known:
            print(f"--sources: unknown {sorted(want - known)}; choose from {sorted(known)}", file=sys.stderr)
            return 2
        prompts = [p for p in prompts if p.src in want]
    jobs = plan_jobs(prompts, args.seed)
    done = {r["key"] for r in iter_records(out_dir)}
    todo = [j for j in jobs if job_key(j) not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    man_path = out_dir / "manifest.json"
    old = json.loads(man_path.read_text()) if man_path.exists() else {}
    runs: list[dict[str, Any]] = list(old.get("runs", []))
    settings = {"model": os.path.relpath(args.model, REPO) if str(args.model).startswith(str(REPO)) else str(args.model),
                "chat_template": os.path.relpath(SERVED_TEMPLATE, REPO), "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": args.max_prompt_tokens,
                "sampled_temperatures": list(SAMPLED_TEMPERATURES), "concurrency": args.concurrency,
                "sources": sorted({p.src for p in prompts})}
    have = corpus_stats(out_dir)["answer_tokens"]
    print(f"pid {os.getpid()} (SIGTERM stops it cleanly): {len(prompts)} prompts, {len(jobs)} jobs, {len(done)} done, {len(todo)} to do; "
          f"{have} answer tokens so far, target {args.target_tokens}", flush=True)
    if have >= args.target_tokens or not todo:
        write_manifest(out_dir, settings, runs)
        print("nothing to do", flush=True)
        return 0

    server = None
    url = args.url
    if url is None:
        from agentserve.profile import load_profile
        from agentserve.server.procs import ServerProcess

        # the corpus is one batch job that keeps 8 requests in flight: the tier gate would turn
        # some away as overload (429), so it is off for this server
        prof = load_profile(args.profile).model_copy(update={"admission_control": False})
        log = Path(args.server_log or Path.home() / ".cache" / "agentserve" / f"corpus-server-{os.getpid()}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(prof, log_path=log)
        print(f"starting SGLang ({args.profile}) on {server.url}", flush=True)
        server.start(timeout=args.start_timeout)
        url = server.url
    restarts = 0
    failures = 0  # consecutive failed requests
    writer = ShardWriter(out_dir)
    t0 = time.time()
    new_tokens = 0
    skipped = 0
    last_log = t0
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shard": writer.path.name}
    runs.append(run)
    try:
        it = iter(todo)
        retry: list[Job] = []  # failed requests go again (after a server restart if it died)
        inflight: dict[Future[dict[str, Any]], Job] = {}
        with ThreadPoolExecutor(args.concurrency) as pool:
            while True:
                while (not stop.is_set() and len(inflight) < args.concurrency and failures < args.concurrency
                       and have + new_tokens < args.target_tokens):
                    job = retry.pop() if retry else next(it, None)
                    if job is None:
                        break
                    job.ids = job.ids or _encode(tok, template, job.prompt)
                    if len(job.ids) > args.max_prompt_tokens:
                        skipped += 1
                        continue
                    inflight[pool.submit(_generate, url, job, args.max_new_tokens, args.request_timeout)] = job
                if not inflight:
                    break
                fin, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fu in fin:
                    job = inflight.pop(fu)
                    try:
                        res = fu.result()
                    except Exception as e:
                        failures += 1
                        retry.append(job)
                        print(f"request {job_key(job)} failed ({failures} in a row): {e}", flush=True)
                        continue
                    failures = 0
                    out_ids = [int(x) for x in res.get("output_ids") or []]
                    fr = (res.get("meta_info") or {}).get("finish_reason") or {}
                    writer.write({"key": job_key(job), "src": job.prompt.src, "domain": DOMAIN_OF[job.prompt.src],
                                  "split": "eval" if is_eval(job.prompt.key) else "train",
                                  "variant": job.variant, "temperature": job.temperature, "seed": job.seed,
                                  "finish": fr.get("type") if isinstance(fr, dict) else str(fr),
                                  "prompt_len": len(job.ids), "ids": job.ids + out_ids})
                    new_tokens += len(out_ids)
                if failures >= args.concurrency and not inflight:
                    # the server died (e.g. the OOM killer on a shared machine): restart it, or give up
                    if server is None or restarts >= args.max_restarts:
                        print(f"{failures} requests failed in a row; stopping (rerun to resume)", flush=True)
                        break
                    restarts += 1
                    print(f"server unreachable: restart {restarts}/{args.max_restarts}", flush=True)
                    server.stop()
                    time.sleep(10)
                    server.start(timeout=args.start_timeout)
                    url = server.url
                    failures = 0
                now = time.time()
                if now - last_log > args.log_every:
                    last_log = now
                    rate = new_tokens / (now - t0)
                    left = max(0, args.target_tokens - have - new_tokens)
                    print(f"[{time.strftime('%H:%M:%S')}] {writer.count} answers, {have + new_tokens} answer tokens "
                          f"({rate:.1f} tok/s this run), ~{left / max(rate, 1e-6) / 3600:.1f} h to target", flush=True)
                    run.update(seconds=now - t0, records=writer.count, answer_tokens=new_tokens)
                    write_manifest(out_dir, settings, runs)
    finally:
        writer.close()
        if server is not None:
            server.stop()
        run.update(seconds=time.time() - t0, records=writer.count, answer_tokens=new_tokens, skipped_long=skipped,
                   stopped_by_signal=stop.is_set(), server_restarts=restarts)
        man = write_manifest(out_dir, settings, runs)
        print(f"run done: {writer.count} answers, {new_tokens} tokens in {time.time() - t0:.0f}s; "
              f"corpus {man['answer_tokens']} answer tokens", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentserve corpus", description="self-distilled drafter corpus")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="answer the prompt pool with the target (resumable; SIGTERM stops cleanly)")
    b.add_argument("--out", default=str(REPO / "corpus"))
    b.add_argument("--target-tokens", type=int, default=500_000, help="stop once this many answer tokens exist")
    b.add_argument("--profile", default=str(DEFAULT_PROFILE), help="profile of the server to start")
    b.add_argument("--url", default=None, help="use a running server instead of starting one")
    b.add_argument("--server-log", default=None)
    b.add_argument("--model", default=str(DEFAULT_MODEL), help="tokenizer (the target's HF directory)")
    b.add_argument("--prompts-dir", default=DEFAULT_PROMPTS_DIR)
    b.add_argument("--cfb", default=str(DEFAULT_CFB) if DEFAULT_CFB.exists() else None,
                   help="nestful-wrapper wheel (or its complexfuncbench folder) for agent/tool prompts")
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--max-prompt-tokens", type=int, default=2048)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit", type=int, default=None, help="at most this many new answers (smoke runs)")
    b.add_argument("--sources", default=None, help="answer only these sources, comma list (e.g. mt-bench)")
    b.add_argument("--request-timeout", type=float, default=900.0)
    b.add_argument("--start-timeout", type=float, default=3600.0,
                   help="seconds to wait for the server's health (a niced start on a loaded 2-core box is slow)")
    b.add_argument("--max-restarts", type=int, default=20, help="server restarts per run after it dies")
    b.add_argument("--log-every", type=float, default=60.0, help="seconds between progress lines")
    s = sub.add_parser("stats", help="print the corpus counts")
    s.add_argument("--out", default=str(REPO / "corpus"))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "build":
        return build(a)
    print(json.dumps(corpus_stats(a.out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
