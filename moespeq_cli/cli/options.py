"""The CLI's options, defined once: those run, chat, serve, profile, bench and plan share
(the README's table of them is generated from these), chat's own (``AnswerTokens``,
``System``, ``ChatJson``) and ``Stop`` (chat's and run's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moespeq_cli.errors import UsageError
from moespeq_cli.model_ref import ALIASES, DEMO

ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help=f"Alias ({', '.join([*ALIASES, DEMO])}), hub id org/name, "
        "or a local checkpoint directory. Default: the built-in demo model.",
        show_default=False,
    ),
]
Prompt = Annotated[
    Optional[str],
    typer.Option(
        "--prompt",
        "-p",
        help="The prompt text. Default: standard input when piped, else the demo's opening lines (shown before its "
        "text on a terminal) or, for another model, 'Write a short poem about the sea.'",
        show_default=False,
    ),
]
PromptFile = Annotated[
    Optional[Path], typer.Option("--prompt-file", help="Read the prompt from a file.", show_default=False)
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")]
AnswerTokens = Annotated[
    Optional[int],
    typer.Option(
        "--max-new-tokens",
        "-n",
        min=1,
        help="An answer's most tokens. Default: 512, or half the context where that is less.",
        show_default=False,
    ),
]


def number_from(lo: float, hi: float):
    """A parser for a float option in [lo, hi] that names the range for every value outside
    it, 'nan' and 'inf' included (typer's own range check called nan "greater than 100")."""

    def parse(value) -> float:
        if isinstance(value, float):  # the default
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a number") from None
        if not lo <= number <= hi:  # also false for nan
            raise typer.BadParameter(f"{value} is not a number from {lo:g} to {hi:g}")
        return number

    return parse


Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        "-t",
        parser=number_from(0.0, 100.0),
        metavar="FLOAT",
        help="0 is greedy (so is anything below 0.0001). At most 100.",
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p", parser=number_from(0.0, 1.0), metavar="FLOAT", help="Nucleus sampling mass, 0 to 1 (1 = off)."
    ),
]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Keep the K most likely tokens (0 = off).")]
Seed = Annotated[
    Optional[int],
    typer.Option(
        "--seed", help="Seed for sampling: the same tokens every time, with or without speculation.", show_default=False
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto | cuda | mock | cpu. auto: cuda when a GPU is visible, "
        "else mock (a simulated GPU on a virtual clock).",
    ),
]
Hardware = Annotated[
    Optional[str],
    typer.Option(
        "--hardware",
        help="Hardware profile name (`moespeq plan --list-hardware`) or a path to one (`moespeq calibrate` writes one for this "
        "machine): timing and default memory. Default: rtx3060-12gb on the mock; with CUDA, this GPU's own "
        "calibration, measured once and cached.",
        show_default=False,
    ),
]
Vram = Annotated[
    Optional[str],
    typer.Option(
        "--vram",
        help="Device memory budget: 12GB, 512MiB, 1.5GB. Default: the profile's memory less what the CUDA context "
        "takes (an RTX 3060 12GB: 11.5 GiB); the demo: 24MiB, so that experts move.",
        show_default=False,
    ),
]
Ram = Annotated[
    Optional[str],
    typer.Option(
        "--ram",
        help="Host memory for expert buffers: 32GB, 8GiB. Experts that do not fit are read from the checkpoint's "
        "files as needed (the disk tier). Default: the memory this machine has available, minus a margin.",
        show_default=False,
    ),
]
Policy = Annotated[str, typer.Option("--policy", help="moespeq | hybrid | gate-prefetch | lru | ondemand | resident.")]
CpuExperts = Annotated[
    Optional[bool],
    typer.Option(
        "--cpu-experts/--no-cpu-experts",
        help="Compute experts that are not on the device on the CPU when that is sooner than copying them, "
        "and (moespeq) resident ones the CPU finishes before the device would reach them "
        "(default: on for moespeq and hybrid).",
        show_default=False,
    ),
]
Draft = Annotated[
    str,
    typer.Option("--draft", help="auto (a saved draft beside the checkpoint, else quantize in memory) | PATH | none."),
]
SpecDepth = Annotated[str, typer.Option("--spec-depth", help="auto (the governor chooses k each cycle) | N (fixed).")]
Trace = Annotated[
    Optional[Path],
    typer.Option("--trace", help="Write the timeline as Chrome trace JSON (Perfetto).", show_default=False),
]
CpuThreads = Annotated[
    Optional[int],
    typer.Option(
        "--cpu-threads",
        min=1,
        max=1024,
        help="Threads for CPU compute (default: torch's; with CPU experts beside a GPU: cores minus one; on the "
        "mock, whose clock is virtual, 1: torch's threads slow down several-fold beside another busy process).",
        show_default=False,
    ),
]
Dtype = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        help="float32 | float16 | bfloat16: what the model computes in. Default: the checkpoint's dtype, in which "
        "a GPU (or the mock's simulated one) holds and moves the weights; the CPU computes the mock's numerics and "
        "--backend cpu's in float32 over the weights as stored. Given, it is also what a GPU holds the dense weights in "
        "(float32 doubles a bf16 checkpoint's, leaving less room for expert slots); routed experts are held and moved as "
        "stored, and --backend cpu keeps every weight as stored.",
        show_default=False,
    ),
]
Chat = Annotated[
    Optional[bool],
    typer.Option(
        "--chat/--no-chat",
        help="Wrap the prompt in the model's chat template (default: when the model has one).",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout at the end, nothing else.")]
ChatJson = Annotated[
    bool,
    typer.Option(
        "--json", help="One JSON object per answer on stdout (JSON Lines), nothing else: for scripts that pipe a chat."
    ),
]
Context = Annotated[
    Optional[int],
    typer.Option(
        "--context",
        "-c",
        min=1,
        help="Tokens of context (prompt + new tokens) to allow and plan memory for; at most the model's "
        "max_position_embeddings. Default: what the prompt and --max-new-tokens need.",
        show_default=False,
    ),
]

ConversationContext = Annotated[  # chat's and serve's: a conversation's, not one prompt's
    Optional[int],
    typer.Option(
        "--context",
        "-c",
        min=1,
        help="Tokens of context a conversation (or a request and its answer) may hold, and memory is planned for; at "
        "most the model's max_position_embeddings. Default: 4096 (the demo: 512), or the model's limit when smaller.",
        show_default=False,
    ),
]

Stop = Annotated[
    Optional[list[str]],
    typer.Option(
        "--stop",
        help="End the output (chat: the answer) before this text, which is left out (repeatable).",
        show_default=False,
        metavar="<str>",
    ),
]
System = Annotated[Optional[str], typer.Option("--system", help="A system message for the conversation.")]


ENGINE_OPTIONS = (
    "backend",
    "hardware",
    "vram",
    "ram",
    "policy",
    "cpu_experts",
    "draft",
    "spec_depth",
    "cpu_threads",
    "dtype",
)


def engine_options(values: dict) -> dict:
    """The EngineOptions fields among a command's arguments (``locals()``); a depth given
    with a policy that has no draft is refused (it would be ignored without a word)."""
    from moespeq_cli.runtime.scheduling.policies import POLICIES

    depth, policy, draft = (
        values.get("spec_depth", "auto"),
        values.get("policy", "moespeq"),
        values.get("draft", "auto"),
    )
    if policy in POLICIES and policy != "moespeq":  # (an unknown one: the engine lists the known)
        if str(depth) not in ("auto", "0"):  # (0: no speculation, which such a policy does anyway)
            raise UsageError(
                f"--spec-depth sets the draft's depth, which only --policy moespeq has; drop it for {policy}"
            )
        if draft not in ("auto", "none"):
            raise UsageError(f"--draft names the draft, which only --policy moespeq runs; drop it for {policy}")
    return {k: values[k] for k in ENGINE_OPTIONS if k in values}
