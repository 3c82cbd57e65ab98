"""The main model's segments as the engines run them: eager, or compiled with static shapes.

The milliseconds of a chunk are in the main model (vision + embeddings, the prefix layers 0..k-1, the suffix
layers k..N-1, the RFSQ head), so that is what gets compiled. `Segments` runs them eagerly; `CompiledSegments`
runs each as its own graph with static shapes — prompts right-padded to `CompileConfig.prompt_tokens`, a fixed
batch — so nothing is recompiled in the control loop:

- "reduce-overhead": `torch.compile` with CUDA graphs — the CUDA default ("auto"): a launch-bound batch-1
  forward becomes one graph replay per segment;
- "aot": `torch.export` + AOTInductor (the inductor graphs behind a C++ wrapper), loaded back with
  `aoti_load_package` — the CPU default ("auto"). Measured on the tiny preset on 2 CPU cores it takes the baseline
  chunk to 0.54x eager where `torch.compile` reaches 0.8x: each `torch.compile` call first evaluates its
  guards over every parameter and config attribute of the module (0.4-0.6 ms per chunk here) and runs a Python
  wrapper, and an AOTInductor package has neither; nothing in it can recompile;
- "inductor": `torch.compile` in its default mode (guards checked on every call, recompiles possible and counted).

Torch draft and decoder engines are compiled the same way (`draft_engine`, `decoder_engine`); ONNX, TorchScript,
TensorRT and `.pt2` engines already are compiled and run as built. Every graph is compiled during `warm_up`
(before the loop); a segment compiled again (a guard failed: its shapes or inputs changed) is counted in
`recompiles` and logged — the count should stay 0.
A segment's inputs and outputs are plain tensors (`state_tensors`), so the same graph modules are what
`rsd.export` packages as `.pt2` files of the main model.

Usage:
    segments = make_segments(main, CompileConfig(mode="auto"))      # or Segments(main) for eager
    engine = MainOnlyEngine(main, decoder, segments=segments)
    engine.warm_up()
    segments.describe()        # {"mode": "inductor", "graphs": 4, "recompiles": 0, ...}
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rsd.bundle import bundle_file
from rsd.errors import CheckpointError, ConfigError, EngineError, ShapeError
from rsd.io import read_manifest, sha256_file
from rsd.models.main import MainModel
from rsd.models.processor import VLAInputs
from rsd.models.vla import PrefixState, PrismaticVLA
from rsd.runtime.engines import TorchDecoderEngine, TorchDraftEngine, load_aoti

log = logging.getLogger(__name__)

SEGMENTS_KIND = "main_segments"  # the manifest kind of a folder of packaged segments
SEGMENTS_FILE = "segments"  # segments.json: fingerprint, exit layer, static shapes, device, files with sha256, parity
CompileMode = Literal["none", "auto", "inductor", "reduce-overhead", "aot"]
MODES = ("none", "auto", "inductor", "reduce-overhead", "aot")


@dataclass(frozen=True)
class CompileConfig:
    """How the runtime compiles the main model's segments, the draft and the decoders."""

    mode: CompileMode = "none"  # "none" (eager), "auto" (reduce-overhead on CUDA, aot on the CPU), "inductor", "reduce-overhead", "aot"
    prompt_tokens: int = 48  # prompts are right-padded to this many tokens (static shapes); a longer prompt is refused
    batch: int = 1  # rows per call (static shapes); another batch size is refused
    warmup: int = 3  # calls of every graph before the loop (compilation, CUDA-graph recording and capture)
    packages: str | None = None  # "aot": a folder written by `rsd export-segments` whose .pt2 segments are loaded, not compiled

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"CompileConfig.mode: expected one of {list(MODES)}, got {self.mode!r}.")
        for name, low in (("prompt_tokens", 1), ("batch", 1), ("warmup", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"CompileConfig.{name}: expected an int >= {low}, got {value!r}.")
        if self.packages is not None and self.mode != "aot":
            raise ConfigError(f"CompileConfig.packages: AOTInductor packages run in mode 'aot', got mode {self.mode!r}.")

    @classmethod
    def of(cls, value: CompileConfig | str) -> CompileConfig:
        """A config from itself or from a mode name ("none", "auto", "inductor", "reduce-overhead", "aot")."""
        return value if isinstance(value, CompileConfig) else cls(mode=value)

    def resolve(self, device: torch.device) -> str:
        """The mode used on `device`: "auto" picks CUDA graphs on CUDA and AOTInductor on the CPU."""
        if self.mode == "auto":
            return "reduce-overhead" if device.type == "cuda" else "aot"
        if self.mode == "reduce-overhead" and device.type != "cuda":
            raise ConfigError(f"CompileConfig.mode: 'reduce-overhead' records CUDA graphs and needs a CUDA device, got {device}. "
                              "Use 'inductor' or 'aot' on the CPU (or 'auto').")
        return self.mode


def state_tensors(state: PrefixState) -> tuple[torch.Tensor, ...]:
    """A prefix state's tensors: hidden `[B, S, D]`, mask `[B, 1, S, S]`, positions `[B, S]`, cos, sin `[B, S, h]`, readout `[B, R]`."""
    cos, sin = state.position_embeddings
    return state.hidden, state.attention_mask, state.position_ids, cos, sin, state.readout


def state_from(tensors: tuple[torch.Tensor, ...], layer: int) -> PrefixState:
    """The prefix state after `layer` layers from `state_tensors`' tuple."""
    hidden, mask, positions, cos, sin, readout = tensors
    return PrefixState(hidden=hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin), layer=layer,
                       readout=readout)


class EmbedGraph(nn.Module):
    """Vision, projector and embeddings as a tensor graph: model inputs → the state tensors at layer 0."""

    def __init__(self, vla: PrismaticVLA) -> None:
        super().__init__()
        self.vla = vla

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                proprio: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`state_tensors` of `vla.embed` for pixel values `[B, N, C, S, S]`, prompt ids and mask `[B, T]`, proprio `[B, P]`."""
        return state_tensors(self.vla.embed(VLAInputs(pixel_values, input_ids, text_mask, proprio)))


class LayersGraph(nn.Module):
    """LLM layers `start .. stop-1` on the state tensors → hidden `[B, S, D]` (the prefix)."""

    def __init__(self, vla: PrismaticVLA, start: int, stop: int) -> None:
        super().__init__()
        self.vla, self.start, self.stop = vla, start, stop

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Hidden `[B, S, D]` after layer `stop - 1`."""
        return self.vla.advance(state_from(tensors, self.start), self.stop).hidden


class ReadoutGraph(nn.Module):
    """LLM layers `start .. N-1`, the final norm and the readout mean → query hidden `[B, D]` (the suffix)."""

    def __init__(self, vla: PrismaticVLA, start: int) -> None:
        super().__init__()
        self.vla, self.start = vla, start

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Query hidden `[B, D]` (what `vla.resume` returns)."""
        return self.vla.resume(state_from(tensors, self.start))


class HeadGraph(nn.Module):
    """The RFSQ head and its argmax: query hidden `[B, D]` → tokens `[B, H, d, L]` int64."""

    def __init__(self, main: MainModel) -> None:
        super().__init__()
        self.main = main

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, H, d, L]` of the main model's head."""
        return self.main.tokens_from_logits(self.main.head(hidden))


class Segments:
    """The main model's segments run eagerly: embed, advance to layer k, resume, head (the reference)."""

    compiled = False

    def __init__(self, main: MainModel) -> None:
        self.main = main
        self.device = next(main.vla.parameters()).device

    def prepare(self, inputs: VLAInputs) -> VLAInputs:
        """Inputs as the segments take them (eager: unchanged)."""
        return inputs

    def begin_step(self) -> None:
        """Mark the start of one engine call (CUDA graphs may reuse the previous call's buffers from here)."""

    def output(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result that outlives the call (CUDA graphs: a copy of the graph's output buffer)."""
        return tensor

    def embed(self, inputs: VLAInputs) -> PrefixState:
        """Vision + embeddings: the state at layer 0."""
        return self.main.vla.embed(inputs)

    def advance(self, state: PrefixState, exit_layer: int) -> PrefixState:
        """Layers `state.layer .. exit_layer-1`: the state after `exit_layer` layers."""
        return self.main.vla.advance(state, exit_layer)

    def resume(self, state: PrefixState) -> torch.Tensor:
        """The remaining layers, final norm and readout: query hidden `[B, D]`."""
        return self.main.vla.resume(state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """RFSQ head and argmax: tokens `[B, H, d, L]` for hidden `[B, D]`."""
        return self.main.tokens_from_logits(self.main.head(hidden))

    def draft_engine(self, engine: Any) -> Any:
        """The draft engine as the engine runs it (eager: unchanged)."""
        return engine

    def decoder_engine(self, engine: Any) -> Any:
        """A decoder engine as the engine runs it (eager: unchanged)."""
        return engine

    def warm_inputs(self) -> VLAInputs:
        """Random inputs of the model's shapes for warm-up calls (one row, a 24-token prompt)."""
        return self.main.vla.random_inputs(batch=1, prompt_len=24)

    def describe(self) -> dict[str, Any]:
        """What runs the segments, for stats and reports."""
        return {"mode": "none"}


class CompiledSegments(Segments):
    """The segments as compiled graphs with static shapes (prompt padded, batch fixed); recompiles are counted."""

    compiled = True

    def __init__(self, main: MainModel, config: CompileConfig, package_dir: Path | None = None) -> None:
        """`package_dir`: where "aot" mode writes its `.pt2` files (a scratch folder when None)."""
        super().__init__(main)
        self.config = config
        self.mode = config.resolve(self.device)
        if self.mode == "none":
            raise ConfigError("CompiledSegments: CompileConfig.mode is 'none'; use Segments (eager) or make_segments.")
        if main.vla.config.cogvla.lfp_layers:
            raise ConfigError(f"CompileConfig: static shapes need a model without LFP token pruning (its sequence shrinks between "
                              f"layers), got cogvla.lfp_layers={main.vla.config.cogvla.lfp_layers}. Run it with compile 'none'.")
        self.graphs = 0  # graphs compiled by the first call of each segment (in the warm-up; one dynamo already holds is reused)
        self.recompiles = 0  # graphs compiled again for a segment already compiled (should stay 0)
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        scratch = self.mode == "aot" and config.packages is None and package_dir is None
        self._scratch = tempfile.TemporaryDirectory(prefix="rsd-aoti-") if scratch else None
        self.package_dir = Path(self._scratch.name) if self._scratch is not None else package_dir
        self.packaged = {} if config.packages is None else read_segments(config.packages, main, config)  # file by segment name
        self.bos_id = main.vla.processor.bos_id  # loads the prompt tokenizer before tracing: the embed graph reads its BOS id
        self._embed = EmbedGraph(main.vla).eval()
        self._head = HeadGraph(main).eval()

    def prepare(self, inputs: VLAInputs) -> VLAInputs:
        """Check the batch and pad the prompt to the static shapes; a mismatch is a ShapeError naming both."""
        if inputs.batch_size != self.config.batch:
            raise ShapeError(f"compiled runtime: expected a batch of {self.config.batch} (CompileConfig.batch, static shapes), "
                             f"got {inputs.batch_size}. Compile with batch={inputs.batch_size} or call with {self.config.batch} rows.")
        padded = inputs.pad_prompt(self.config.prompt_tokens)
        # Fresh copies made here, under the engine's inference mode: the graphs' guards see one kind of tensor whether the
        # caller's came from inference mode or not (a mismatch of dispatch keys would recompile).
        fresh = (None if t is None else t.to(self.device, copy=True)
                 for t in (padded.pixel_values, padded.input_ids, padded.text_mask, padded.proprio))
        return VLAInputs(*fresh)

    def begin_step(self) -> None:
        """Mark the start of one engine call for CUDA graph trees (the previous call's outputs may be overwritten)."""
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def output(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of a CUDA-graph output buffer (the next replay overwrites it); other modes return it as is."""
        return tensor.clone() if self.mode == "reduce-overhead" else tensor

    def embed(self, inputs: VLAInputs) -> PrefixState:
        """Vision + embeddings (one graph): the state at layer 0."""
        args = (inputs.pixel_values, inputs.input_ids, inputs.text_mask)
        args += () if inputs.proprio is None else (inputs.proprio,)
        return state_from(self._run(("embed",), self._embed, args), 0)

    def advance(self, state: PrefixState, exit_layer: int) -> PrefixState:
        """Layers `state.layer .. exit_layer-1` (one graph per range)."""
        if exit_layer == state.layer:
            return state
        key = ("layers", state.layer, exit_layer)
        hidden = self._run(key, lambda: LayersGraph(self.main.vla, state.layer, exit_layer).eval(), state_tensors(state))
        return state_from((hidden, *state_tensors(state)[1:]), exit_layer)

    def resume(self, state: PrefixState) -> torch.Tensor:
        """Layers `state.layer .. N-1`, final norm and readout (one graph per start layer): query hidden `[B, D]`."""
        return self._run(("readout", state.layer), lambda: ReadoutGraph(self.main.vla, state.layer).eval(), state_tensors(state))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """RFSQ head and argmax (one graph): tokens `[B, H, d, L]`."""
        return self._run(("head",), self._head, (hidden,))

    def draft_engine(self, engine: Any) -> Any:
        """A torch draft engine with its graph compiled here; other formats run as built (logged)."""
        if not isinstance(engine, TorchDraftEngine) or self.config.packages is not None:
            log.info("compiled runtime: the %s draft engine runs as built (compile applies to torch engines; packaged segments "
                     "compile nothing: use the bundle's aotinductor engines)", engine.name)
            return engine
        graph, compiled = engine.graph, copy.copy(engine)
        compiled.graph = lambda hidden: self._run(("draft", id(graph)), graph, (hidden,))
        return compiled

    def decoder_engine(self, engine: Any) -> Any:
        """A torch decoder engine with its graph compiled here; other formats run as built."""
        if not isinstance(engine, TorchDecoderEngine) or self.config.packages is not None:
            return engine
        decoder, compiled = engine.decoder, copy.copy(engine)
        compiled.decoder = lambda tokens: self._run(("decoder", id(decoder)), decoder, (tokens,))
        return compiled

    def warm_inputs(self) -> VLAInputs:
        """Random inputs of the static shapes (batch, padded prompt) for the warm-up calls."""
        return self.main.vla.random_inputs(batch=self.config.batch, prompt_len=self.config.prompt_tokens)

    def describe(self) -> dict[str, Any]:
        """Mode, graphs compiled in warm-up, recompiles since, and the static shapes."""
        return {"mode": self.mode, "graphs": self.graphs, "recompiles": self.recompiles, "batch": self.config.batch,
                "prompt_tokens": self.config.prompt_tokens}

    def _run(self, key: tuple[Any, ...], module: nn.Module | Callable[[], nn.Module], args: tuple[Any, ...]) -> Any:
        """Call the compiled graph of `key` (compiled from `module` on first use) and count graphs compiled by the call."""
        from torch._dynamo.utils import counters

        # contiguous: an AOTInductor package assumes its example's strides without checking them, and torch.compile
        # would recompile for a view (e.g. tokens[..., :3]) where it saw a contiguous tensor
        args = tuple(arg.contiguous() for arg in args)
        compiled = self._compiled.get(key)
        before = counters["stats"]["unique_graphs"]
        if compiled is None:
            graph = module if isinstance(module, nn.Module) else module()
            compiled = self._compiled[key] = self._compile(key, graph, args)
            out = compiled(*args)
            self.graphs += counters["stats"]["unique_graphs"] - before + int(self.mode == "aot")  # dynamo does not count AOTI packages
            return out
        out = compiled(*args)
        new = counters["stats"]["unique_graphs"] - before
        if new:
            self.recompiles += new
            log.warning("compiled runtime: %s was recompiled (%d graph(s), %d recompiles so far): its static shapes changed", key, new,
                        self.recompiles)
        return out

    def _compile(self, key: tuple[Any, ...], graph: nn.Module, args: tuple[Any, ...]) -> Callable[..., Any]:
        """`torch.compile` (fullgraph, static shapes), or in "aot" mode export + AOTInductor (or the packaged `.pt2`) loaded back."""
        if self.mode != "aot":
            return torch.compile(graph, fullgraph=True, dynamic=False, mode="reduce-overhead" if self.mode == "reduce-overhead" else None)
        name = segment_name(key)
        if self.config.packages is not None:
            if name not in self.packaged:
                raise EngineError(f"{self.config.packages}: expected a packaged segment {name!r} for this call, the packages hold "
                                  f"{sorted(self.packaged)}. Export the segments of the exit layer you run (rsd export-segments), or "
                                  "use the bundle's aotinductor draft and decoders.")
            return load_aoti(self.packaged[name], self.device)
        assert self.package_dir is not None, "aot mode without packages compiles into a scratch folder"
        return load_aoti(compile_aoti(graph, args, self.package_dir / f"{name}.pt2"), self.device)


def segment_name(key: tuple[Any, ...]) -> str:
    """A segment's file stem: "embed", "layers_0_3" (the prefix), "readout_3" (the suffix), "head", ..."""
    return "_".join(str(part) for part in key)


def read_segments(folder: str | Path, main: MainModel, config: CompileConfig) -> dict[str, Path]:
    """The verified `.pt2` files of a segments folder by name: kind, main-model fingerprint, static shapes, device and hashes checked."""
    folder = Path(folder)
    manifest = read_manifest(folder, SEGMENTS_FILE, kind=SEGMENTS_KIND)
    device = next(main.vla.parameters()).device
    expected = {"main_fingerprint": main.fingerprint, "prompt_tokens": config.prompt_tokens, "batch": config.batch, "device": device.type}
    for field, want in expected.items():
        if manifest.get(field) != want:
            raise CheckpointError(f"{folder}: the segments were packaged for {field} {manifest.get(field)!r}, expected {want!r} "
                                  f"(the main model and CompileConfig). Re-run `rsd export-segments` for this model and these shapes.")
    files = {}
    for entry in manifest["files"]:
        path = bundle_file(folder, entry["path"])
        found = sha256_file(path) if path.is_file() else "no file"
        if found != entry["sha256"]:
            raise CheckpointError(f"{path}: expected sha256 {entry['sha256']}, found {found}; the package changed after export. "
                                  "Re-run `rsd export-segments`.")
        files[entry["name"]] = path
    return files


def compile_aoti(module: nn.Module, args: tuple[Any, ...], path: Path, dynamic_shapes: Any = None) -> Path:
    """`torch.export` `module` at `args` (static shapes unless `dynamic_shapes`) and package it with AOTInductor at `path`."""
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def make_segments(main: MainModel, compile: CompileConfig | str = "none") -> Segments:
    """Eager `Segments` for mode "none", else `CompiledSegments` with the config."""
    config = CompileConfig.of(compile)
    return Segments(main) if config.mode == "none" else CompiledSegments(main, config)
