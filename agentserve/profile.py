"""Serving profiles: one YAML file says which model, which drafter, which SGLang options and
which interactivity tiers a server runs with.

Validation is pydantic's (extra keys forbidden, strict types); `ProfileError` turns its
report into one line per bad field, e.g. ``interactivity_tiers[1].target_tokens_per_s: must be
greater than 0 (got -5)``, so a user never sees a traceback for a typo.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Speculative algorithms a profile may select. "agent_ngram" is our plugin-registered
# n-gram worker (proves the plugin path); "agentspark" is our DSpark worker; "ngram" and
# "dspark" are SGLang's own, kept as baselines ("dspark" is upstream's DSPARK worker, which
# SGLang runs only on CUDA, NPU or XPU).
Algorithm = Literal["none", "ngram", "agent_ngram", "agentspark", "dspark"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSpec(_Strict):
    path: str = Field(description="HF-format model directory; relative paths are relative to the profile file")
    chat_template: str | None = Field(default=None, description="Jinja chat template file (relative to the profile) or an SGLang template name")
    tool_call_parser: str | None = None
    # How hard SGLang constrains tool calls: "parameter" makes every call's arguments follow
    # the tool's JSON schema (as OpenAI's strict=true does per tool); small models need it.
    tool_strict: Literal["off", "function", "parameter"] = "off"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    context_length: int | None = Field(default=None, gt=0)


class DrafterSpec(_Strict):
    algorithm: Algorithm = "none"
    path: str | None = Field(default=None, description="drafter checkpoint directory (agentspark)")
    num_draft_tokens: int = Field(default=8, ge=2, le=64, description="verify width: the longest copied draft + 1 (the model drafts its trained block, at most this - 1)")
    # copied drafts from the session's suffix index (and, with radix_tree, from SGLang's radix
    # tree: what followed this exact sequence in an earlier request)
    radix_drafting: bool = True
    radix_tree: bool = True
    # copied drafts across sessions: what earlier sessions of the same agent (or tier, or any
    # request) read and wrote, in one bounded index per scope (sglang_ext/copy/shared_index.py)
    shared_index: Literal["agent", "tier", "global", "off"] = "agent"
    # How verify lengths are chosen: "tier_aware" (Algorithm 1 with tier weights and caps),
    # "throughput" (the paper's Algorithm 1 alone), "verify_all" (every draft, no scheduler).
    scheduler: Literal["tier_aware", "throughput", "verify_all"] = "tier_aware"
    # each request verifies only its own 1 + l_r positions (false: every row padded to the
    # widest, SGLang's uniform TARGET_VERIFY layout)
    ragged_verify: bool = True
    # a step verifies drafts only if its expected tokens per second beat plain decoding's by
    # this fraction (a margin for the step-cost model's error where drafts barely pay)
    min_step_gain: float = Field(default=0.0, ge=0, le=1)
    # How the draft gate prices a model-drafted request: "draft" (the drafter call only; the plan
    # cuts the verify from the block's confidences), "block" (the call and its whole block's
    # verify), or "auto": "draft" with the "block" estimate up to gate_cut_max_batch requests in
    # the step, "block" with the "confidence" estimate above (measured: draft pricing pays at one
    # request, costs at 8; sglang_ext/spec/draft_gate.py)
    gate_cost: Literal["auto", "draft", "block"] = "auto"
    gate_cut_max_batch: int = Field(default=1, ge=0, le=1024)
    # with an explicit gate_cost, what the gate expects of a request's next model block: "block"
    # (the confidence head's expectation over its earlier whole blocks), "confidence" (the mean
    # of that expectation over the verified drafts and their accepted count) or "accepted" (the
    # counts alone, noisier)
    gate_estimate: Literal["block", "confidence", "accepted"] = "confidence"
    # a request the gate skips drafts again (a probe) after this many skipped steps; each probe
    # that still does not pay doubles the interval up to gate_max_probe_every
    gate_probe_every: int = Field(default=8, ge=1, le=1024)
    gate_max_probe_every: int = Field(default=64, ge=1, le=1024)
    # drafter context K/V of ended requests kept (positions, all requests together) to seed a
    # later prompt whose prefix the radix cache holds: its prefill skips those positions, so the
    # target's features of them come from the request that computed them (spec/contexts.py);
    # 0 turns it off. About 1.5 KB a position for the bundled drafter.
    context_keep_tokens: int = Field(default=32768, ge=0, le=10_000_000)

    @field_validator("shared_index", mode="before")
    @classmethod
    def _off_is_not_false(cls, v: object) -> object:
        # YAML 1.1 reads an unquoted `off` as false: `shared_index: off` means "off"
        return "off" if v is False else v

    @model_validator(mode="after")
    def _needs_path(self) -> DrafterSpec:
        if self.algorithm in ("agentspark", "dspark") and not self.path:
            raise ValueError(f"path: required when algorithm is '{self.algorithm}'")
        return self


class ServerSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=30000, ge=1, le=65535)
    device: Literal["cpu", "cuda", "xpu", "npu"] = "cpu"
    attention_backend: str | None = None
    mem_fraction_static: float | None = Field(default=None, gt=0, le=1)
    max_total_tokens: int | None = Field(default=None, gt=0)
    max_running_requests: int | None = Field(default=None, gt=0)
    chunked_prefill_size: int | None = Field(default=None, gt=0)
    # SGLang's --prefill-decode-interval: decode rounds run after each prefill batch (or chunk)
    # before the next one, so running streams keep moving while a long prompt is prefilled
    prefill_decode_interval: int | None = Field(default=None, ge=0)
    enable_metrics: bool = True
    # bf16 models on a CPU: "auto" times bf16 against fp32 GEMM per weight shape and row count
    # and uses the faster (sglang_ext/cpu/matmul.py); "native": always the model's dtype;
    # "fp32": fp32 GEMM for every product of two or more rows, without timing
    cpu_matmul: Literal["auto", "native", "fp32"] = "auto"
    # half-precision models on a CPU: "fp32" runs decode attention over the gathered K/V in fp32
    # (about 2x faster where the CPU has no native bf16; sglang_ext/cpu/attention.py),
    # "native" leaves SGLang's decode attention in the model's dtype
    cpu_attention: Literal["fp32", "native"] = "fp32"
    # exact mode: every row computed as if alone (linears in fixed row tiles, attention in
    # float64; sglang_ext/cpu/exact.py), so greedy output does not depend on the batch and the
    # speculative server's equals plain's byte for byte in bf16; costs speed (docs/results.md)
    deterministic: bool = False
    extra_args: list[str] = Field(default_factory=list, description="passed to SGLang verbatim, after ours")


# A best-effort tier (no target) keeps at least this share of the admissions of the last window
# unless its profile says otherwise: promised tiers come first, but no tier starves.
BEST_EFFORT_MIN_SHARE = 0.05


class Tier(_Strict):
    """An interactivity tier: what a request of it is promised, and how it is admitted.

    The only tier type: the admission gate (sglang_ext/tiers/admission.py) and the scheduler's
    tier policy (sglang_ext/tiers/policy.py) wrap it with runtime state and read its fields."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    target_tokens_per_s: float | None = Field(default=None, gt=0, description="promised decode speed per user; null = best effort")
    # The wait counts too: a request meets its tier's promise only if its first token came within
    # this many seconds of its arrival (admission queue included) AND it decoded at the target speed.
    target_ttft_s: float | None = Field(default=None, gt=0, description="promised time to first token, queue wait included")
    priority: int = Field(default=0, ge=0, description="0 is served first")
    max_concurrency: int | None = Field(default=None, gt=0)
    on_overload: Literal["queue", "reject"] = "queue"
    queue_timeout_s: float = Field(default=30.0, gt=0, description="longest wait in the admission queue before a 429")
    # Starve no one: while the tier has requests waiting and its share of the admissions of the
    # last window is below this, its next request starts whatever more important tiers need.
    # null: BEST_EFFORT_MIN_SHARE for a best-effort tier, 0 for a promised one.
    min_share: float | None = Field(default=None, ge=0, lt=1, description="least share of admissions kept for this tier")
    # How a new request of this tier is priced before it starts: "expected_speed" at the tier's
    # tokens per step so far (most answers keep the target, more run at once); "plain_speed" at
    # plain decoding's (a request's drafts are unknown until it runs, so every admitted answer
    # keeps the target whatever it copies; fewer run at once).
    admit_at: Literal["expected_speed", "plain_speed"] = "expected_speed"

    @field_validator("target_tokens_per_s", "target_ttft_s", "queue_timeout_s", "min_share", mode="before")
    @classmethod
    def _int_ok(cls, v: Any) -> Any:
        # YAML writes 20 as an int; strict mode would refuse it for a float field.
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def promised(self) -> bool:
        return self.target_tokens_per_s is not None or self.target_ttft_s is not None

    @property
    def share_floor(self) -> float:
        if self.min_share is not None:
            return self.min_share
        return 0.0 if self.promised else BEST_EFFORT_MIN_SHARE

    def met(self, tokens_per_s: float | None, ttft_s: float | None) -> bool | None:
        """Did a finished request keep this tier's promise? None: the tier promises nothing, or
        nothing it promises was measured. A promise that was set but not measured counts as missed."""
        if not self.promised or (tokens_per_s is None and ttft_s is None):
            return None
        speed_ok = self.target_tokens_per_s is None or (tokens_per_s is not None and tokens_per_s >= self.target_tokens_per_s)
        wait_ok = self.target_ttft_s is None or (ttft_s is not None and ttft_s <= self.target_ttft_s)
        return speed_ok and wait_ok


class SessionSpec(_Strict):
    # An agent session lives while it is used: each request through it renews the idle TTL.
    ttl_s: float = Field(default=600.0, gt=0, description="idle seconds before a session expires")
    max_sessions: int = Field(default=1024, gt=0, description="open sessions at once; more are refused with 429")

    @field_validator("ttl_s", mode="before")
    @classmethod
    def _int_ok(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class AgentSpec(_Strict):
    """An agent the profile knows. Written as a bare tier name (`planner: interactive`) or a mapping."""

    tier: str | None = Field(default=None, description="the agent's tier when a request names none")
    # Tiers the agent may ask for with x-agent-tier (checked when keys are configured). null: its
    # own tier (or the default tier) and every less important one.
    tiers: list[str] | None = None
    # The agent's API key, read from this environment variable when the server starts (never
    # written in the profile). Clients send it as `Authorization: Bearer <key>`.
    key_env: str | None = Field(default=None, pattern=ENV_NAME)


class AuthSpec(_Strict):
    """Where the API keys are. With none configured the server is open (and logs so at start-up)."""

    # A YAML file `{admin: <key>, agents: {<agent id>: <key>}}`, relative to the profile; keep it
    # out of version control and readable by the server's user only.
    keys_file: str | None = None
    # The admin key (for /metrics, /agentserve/v1/agents, session listing and SGLang's other
    # endpoints), read from this environment variable at start-up.
    admin_key_env: str | None = Field(default=None, pattern=ENV_NAME)

    @property
    def configured(self) -> bool:
        return self.keys_file is not None or self.admin_key_env is not None


class Profile(_Strict):
    name: str = Field(min_length=1)
    model: ModelSpec
    drafter: DrafterSpec = Field(default_factory=DrafterSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    interactivity_tiers: list[Tier] = Field(default_factory=list)
    default_tier: str | None = None
    agents: dict[str, AgentSpec] = Field(default_factory=dict, description="agent id -> its tier (or an AgentSpec)")
    # true: only the agent ids listed in `agents` may generate (others get 403 naming x-agent-id)
    require_known_agents: bool = False
    auth: AuthSpec = Field(default_factory=AuthSpec)
    sessions: SessionSpec = Field(default_factory=SessionSpec)
    # Tier admission (queue/reject when promised tiers cannot be met); off: tiers only label
    # requests and weight the scheduler (benchmarks compare both).
    admission_control: bool = True
    # Predictive admission: hold a request back when the scheduler's measured step period and
    # τ predict a promised tier would fall below (1 + margin) x its target (admission.py rule c).
    admission_predict: bool = True
    admission_margin: float = Field(default=0.1, ge=0, le=1, description="headroom over a tier's target")
    # Prefill pacing (agentspark, tier_aware scheduler): the waiting queue is prefilled most
    # important tier first, and a prefill waits while its stall and the larger batch after it
    # would put a running promised request below its target: after this many seconds only for
    # an answer already decoding, after 3x not at all; 0 = off. sglang_ext/tiers/pacing.py
    prefill_max_defer_s: float = Field(
        default=10.0, ge=0,
        description="seconds after which a held prefill waits only for an answer already decoding; 3x this at most (0: off)")

    @field_validator("agents", mode="before")
    @classmethod
    def _bare_tier(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"tier": a} if isinstance(a, str) else a for k, a in v.items()}
        return v

    @model_validator(mode="after")
    def _tiers_consistent(self) -> Profile:
        if self.drafter.algorithm == "dspark" and self.server.device == "cpu":
            raise ValueError("drafter.algorithm: 'dspark' is SGLang's own DSPARK worker, which SGLang runs only on "
                             "cuda, npu or xpu (server.device is cpu); use 'agentspark', ours, on a CPU")
        names = [t.name for t in self.interactivity_tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"interactivity_tiers: duplicate tier name(s) {dupes}")
        if self.default_tier is not None and self.default_tier not in names:
            raise ValueError(f"default_tier: '{self.default_tier}' is not one of the interactivity_tiers {names}")
        for agent, spec in self.agents.items():
            for where, tier in [("tier", spec.tier)] + [(f"tiers[{i}]", t) for i, t in enumerate(spec.tiers or [])]:
                if tier is not None and tier not in names:
                    raise ValueError(f"agents.{agent}.{where}: tier '{tier}' is not one of the interactivity_tiers {names}")
            if spec.tier is not None and spec.tiers is not None and spec.tier not in spec.tiers:
                raise ValueError(f"agents.{agent}.tiers: must include the agent's own tier '{spec.tier}'")
        return self

    # Paths in a profile are relative to the profile file, so a profile can be run from anywhere.
    def resolve(self, base: Path) -> Profile:
        def res(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())

        tmpl = self.model.chat_template
        if tmpl is not None and (tmpl.endswith(".jinja") or "/" in tmpl):
            tmpl = res(tmpl)
        model = self.model.model_copy(update={"path": res(self.model.path), "chat_template": tmpl})
        drafter = self.drafter.model_copy(update={"path": res(self.drafter.path)})
        auth = self.auth.model_copy(update={"keys_file": res(self.auth.keys_file)})
        return self.model_copy(update={"model": model, "drafter": drafter, "auth": auth})

    def tier_for(self, agent_id: str | None = None, requested: str | None = None) -> Tier | None:
        """The one tier resolver: an explicit request wins, then the agent's own tier, then the
        profile's default. An unknown name raises UnknownTier (a ProfileError naming it)."""
        by_name = {t.name: t for t in self.interactivity_tiers}
        spec = self.agents.get(agent_id or "")
        for name in (requested, spec.tier if spec else None, self.default_tier):
            if name:
                if name not in by_name:
                    raise UnknownTier(name, sorted(by_name))
                return by_name[name]
        return None

    def allowed_tiers(self, agent_id: str) -> set[str]:
        """Tiers an agent may ask for: its `tiers`, else its own (or the default) tier and every
        less important one (all tiers when it has neither)."""
        spec = self.agents.get(agent_id)
        if spec is not None and spec.tiers is not None:
            return set(spec.tiers)
        own = self.tier_for(agent_id)
        return {t.name for t in self.interactivity_tiers if own is None or t.priority >= own.priority}


class ProfileError(ValueError):
    """A profile that cannot be used; `problems` has one 'field: what is wrong' line each."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid profile {source}" if source else "invalid profile"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


class UnknownTier(ProfileError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__([f"tier: unknown tier '{name}' (known: {known})"])


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "literal[")):
            continue
        else:  # a key that is empty or has odd characters is shown quoted
            name = str(part) if re.fullmatch(r"[A-Za-z0-9_.-]+", str(part)) else repr(str(part))
            out += ("." if out else "") + name
    return out


def _describe(err: dict[str, Any]) -> str:
    loc = _loc(tuple(err["loc"]))
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # model-level validators already name their field
        return msg if not loc else f"{loc}.{msg}" if ":" in msg.split(" ")[0] else f"{loc}: {msg}"
    msg = msg[0].lower() + msg[1:]
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"{loc}: {msg} (got {shown})" if loc else f"{msg} (got {shown})"


def parse_profile(data: Any, source: str | None = None, base: Path | None = None) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError([f"top level: expected a mapping of profile fields, got {type(data).__name__}"], source)
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError([_describe(err) for err in e.errors()], source) from None
    return prof.resolve(base) if base is not None else prof


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    if not p.is_file():
        raise ProfileError([f"file: {p} does not exist"], str(p))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ProfileError([f"yaml: {e}"], str(p)) from None
    return parse_profile(data, str(p), p.parent.resolve())
