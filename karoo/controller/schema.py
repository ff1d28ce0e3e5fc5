"""The product configuration: a JSON document shaped like katsdpcontroller's.

A product configuration names the streams a subarray product consumes (``inputs``), those it
produces (``outputs``, which may include a simulated correlator), product-wide settings
(``config``) and the simulated observation (``simulation``)::

    {
      "version": "1.0",
      "outputs": {
        "cbf_baseline_correlation_products": {
          "type": "sim.cbf.baseline_correlation_products",
          "n_antennas": 4, "n_chans": 1024, "int_time": 0.5, "n_substreams": 4},
        "sdp_l0": {"type": "sdp.vis", "src_streams": ["cbf_baseline_correlation_products"],
                   "output_int_time": 1.0, "continuum_factor": 1, "archive": true},
        "cal": {"type": "sdp.cal", "src_streams": ["sdp_l0"]},
        "sdp_l0_cal_flags": {"type": "sdp.flags", "src_streams": ["sdp_l0", "cal"],
                             "archive": true}
      },
      "config": {"store": "/var/kat/data"},
      "simulation": {"script": "calibrator-target"}
    }

`validate_config` checks the document against `PRODUCT_CONFIG_SCHEMA` (JSON Schema draft 2020-12)
and then the relations the schema cannot express (source streams exist and have the right
types, one ingest group per correlator stream, ...). Every problem is reported with its path in
the document, in one `ConfigError`.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

SCHEMA_VERSIONS = ("1.0",)

_STREAM_NAME = "^[A-Za-z0-9_]+$"
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}

_SRC = {"type": "array", "items": {"type": "string"}}

_STREAM_TYPES: dict[str, dict[str, Any]] = {
    # A real correlator: its SPEAD URL, and the CBF attributes karoo ingest needs from telstate
    # (on a telescope CAM provides them; here they can be given in the configuration).
    "cbf.baseline_correlation_products": {
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "minLength": 1},
            "instrument_dev_name": {"type": "string"},
            "attributes": {"type": "object"},
        },
    },
    "sim.cbf.baseline_correlation_products": {
        "required": ["n_antennas", "n_chans", "int_time"],
        "properties": {
            "n_antennas": {"type": "integer", "minimum": 1, "maximum": 64},
            "n_chans": {"type": "integer", "minimum": 1},
            "int_time": _POSITIVE,
            "n_substreams": {"type": "integer", "minimum": 1},
            "n_endpoints": {"type": "integer", "minimum": 1},
        },
    },
    "sdp.vis": {
        "required": ["src_streams", "output_int_time", "continuum_factor"],
        "properties": {
            "src_streams": {**_SRC, "minItems": 1, "maxItems": 1},
            "output_int_time": _POSITIVE,
            "continuum_factor": {"type": "integer", "minimum": 1},
            "archive": {"type": "boolean"},
        },
    },
    "sdp.cal": {
        "required": ["src_streams"],
        "properties": {
            "src_streams": {**_SRC, "minItems": 1, "maxItems": 1},
            "buffer_dumps": {"type": "integer", "minimum": 1},
            "parameters": {"type": "object"},
        },
    },
    "sdp.flags": {
        "required": ["src_streams"],
        "properties": {
            "src_streams": {**_SRC, "minItems": 2, "maxItems": 2},
            "archive": {"type": "boolean"},
        },
    },
}

# Which stream types each stream type may take as its src_streams, in order.
_SOURCE_TYPES: dict[str, list[set[str]]] = {
    "sdp.vis": [{"cbf.baseline_correlation_products", "sim.cbf.baseline_correlation_products"}],
    "sdp.cal": [{"sdp.vis"}],
    "sdp.flags": [{"sdp.vis"}, {"sdp.cal"}],
}

INPUT_TYPES = ("cbf.baseline_correlation_products",)
OUTPUT_TYPES = tuple(t for t in _STREAM_TYPES if t not in INPUT_TYPES)


def _stream_schema(types: tuple[str, ...]) -> dict[str, Any]:
    """A stream definition: ``type`` picks which of the per-type schemas applies."""
    return {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": list(types)}},
        "allOf": [
            {
                "if": {"properties": {"type": {"const": name}}},
                "then": {
                    "required": spec["required"],
                    "properties": {"type": {"const": name}, **spec["properties"]},
                    "additionalProperties": False,
                },
            }
            for name, spec in _STREAM_TYPES.items()
            if name in types
        ],
    }


PRODUCT_CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "karoo product configuration",
    "type": "object",
    "required": ["version", "outputs"],
    "additionalProperties": False,
    "properties": {
        "version": {"enum": list(SCHEMA_VERSIONS)},
        "inputs": {
            "type": "object",
            "propertyNames": {"pattern": _STREAM_NAME},
            "additionalProperties": _stream_schema(INPUT_TYPES),
        },
        "outputs": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": _STREAM_NAME},
            "additionalProperties": _stream_schema(OUTPUT_TYPES),
        },
        "config": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "store": {"type": "string", "minLength": 1},
                "s3_endpoint_url": {"type": "string"},
                "ingest_servers": {"type": "integer", "minimum": 1},
                "cal_servers": {"type": "integer", "minimum": 1},
                "backend": {"enum": ["cpu", "cuda"]},
                "transport": {"enum": ["multicast", "udp", "inproc"]},
                "multicast_cidr": {"type": "string"},
                "writer": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "obj_size_mb": _POSITIVE,
                        "obj_max_dumps": {"type": "integer", "minimum": 1},
                        "buffer_mb": _POSITIVE,
                        "workers": {"type": "integer", "minimum": 1},
                        # Chunks per Zarr shard (dumps, channels); absent: one object per chunk.
                        "shard_chunks": {"type": "array", "minItems": 2, "maxItems": 2,
                                         "items": {"type": "integer", "minimum": 1}},
                    },
                },
                "service_overrides": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"config": {"type": "object"}},
                    },
                },
            },
        },
        "simulation": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "script": {"type": "string", "minLength": 1},
                # passed to the simulator (karoo sim options of the same names)
                "clock_ratio": {"type": "number", "minimum": 0},
                "seed": {"type": "integer"},
                "snr": {"type": "number", "minimum": 0},
                "rfi": {"type": "number", "minimum": 0},
                "heap_loss": {"type": "number", "minimum": 0, "maximum": 1},
                "max_dumps": {"type": "integer", "minimum": 0},
                "truth_dir": {"type": "string"},
            },
        },
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(PRODUCT_CONFIG_SCHEMA)


class ConfigError(ValueError):
    """A product configuration that is not valid; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid product configuration: " + "; ".join(problems))


def _where(path) -> str:
    return "/".join(str(p) for p in path) or "(top level)"


def _schema_problems(config: Any) -> list[str]:
    problems = []
    for error in sorted(_VALIDATOR.iter_errors(config), key=lambda e: list(e.absolute_path)):
        # An if/then branch reports its own errors, more precisely than the branch itself.
        if error.context:
            for sub in error.context:
                problems.append(f"{_where(list(error.absolute_path) + list(sub.path))}: "
                                f"{sub.message}")
        else:
            problems.append(f"{_where(error.absolute_path)}: {error.message}")
    return problems


def _relation_problems(config: dict[str, Any]) -> list[str]:
    inputs = config.get("inputs", {})
    outputs = config["outputs"]
    problems = [f"stream {name!r} is both an input and an output"
                for name in sorted(set(inputs) & set(outputs))]
    streams = {**inputs, **outputs}
    for name, stream in outputs.items():
        allowed = _SOURCE_TYPES.get(stream["type"])
        if allowed is None:
            continue
        for i, src in enumerate(stream["src_streams"]):
            where = f"outputs/{name}/src_streams/{i}"
            if src not in streams:
                problems.append(f"{where}: no stream named {src!r}")
            elif streams[src]["type"] not in allowed[i]:
                problems.append(f"{where}: {src!r} is a {streams[src]['type']} stream; "
                                f"expected {' or '.join(sorted(allowed[i]))}")
    if problems:
        return problems
    # One ingest group per correlator stream: at most one spectral and one continuum output.
    for cbf in {s["src_streams"][0] for s in outputs.values() if s["type"] == "sdp.vis"}:
        vis = [(n, s) for n, s in outputs.items()
               if s["type"] == "sdp.vis" and s["src_streams"][0] == cbf]
        spectral = [n for n, s in vis if s["continuum_factor"] == 1]
        continuum = [n for n, s in vis if s["continuum_factor"] > 1]
        if len(spectral) != 1 or len(continuum) > 1:
            problems.append(
                f"outputs: the sdp.vis streams of {cbf!r} must be one spectral stream "
                f"(continuum_factor 1) and at most one continuum stream; got "
                f"spectral {spectral}, continuum {continuum}")
        elif continuum and outputs[continuum[0]]["output_int_time"] != \
                outputs[spectral[0]]["output_int_time"]:
            problems.append(f"outputs/{continuum[0]}/output_int_time: must equal that of "
                            f"{spectral[0]!r} (one ingest makes both)")
    cals = [n for n, s in outputs.items() if s["type"] == "sdp.cal"]
    if len(cals) > 1:
        problems.append(f"outputs: at most one sdp.cal stream is supported; got {cals}")
    for name, stream in outputs.items():
        if stream["type"] == "sdp.flags":
            vis, cal = stream["src_streams"]
            if outputs.get(cal, {}).get("src_streams", [None])[0] != vis:
                problems.append(f"outputs/{name}/src_streams: {cal!r} calibrates "
                                f"{outputs[cal]['src_streams'][0]!r}, not {vis!r}")
    if "simulation" in config and not any(
        s["type"].startswith("sim.") for s in outputs.values()
    ):
        problems.append("simulation: given, but no sim.* output stream to simulate")
    return problems


def validate_config(config: dict[str, Any] | str | bytes) -> dict[str, Any]:
    """Check a product configuration and return it as a dict (a copy; JSON text is parsed).

    Parameters
    ----------
    config
        The configuration, as a dict or as JSON text.

    Raises
    ------
    ConfigError
        If the JSON does not parse, does not match `PRODUCT_CONFIG_SCHEMA`, or its streams do
        not fit together; the message lists each problem with its path in the document.
    """
    if isinstance(config, str | bytes):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"not valid JSON: {exc}"]) from None
    problems = _schema_problems(config)
    if problems:
        raise ConfigError(problems)
    problems = _relation_problems(config)
    if problems:
        raise ConfigError(problems)
    return copy.deepcopy(config)


def simulated_config(
    n_antennas: int = 4,
    n_chans: int = 1024,
    int_time: float = 0.5,
    output_int_time: float = 1.0,
    continuum_factor: int = 16,
    script: str = "short",
    simulation: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """A product configuration for a simulated correlator with the full SDP chain.

    Simulator -> ingest (spectral ``sdp_l0`` and, if `continuum_factor` > 1, continuum
    ``sdp_l0_continuum``) -> vis writer and cal -> flag writer (``sdp_l0_cal_flags``) -> meta
    writer. `simulation` adds simulator settings (``clock_ratio``, ``seed``, ``truth_dir``, ...);
    `settings` become the ``config`` section (``store``, ``ingest_servers``, ...).
    """
    cbf = "cbf_baseline_correlation_products"
    outputs: dict[str, Any] = {
        cbf: {"type": "sim.cbf.baseline_correlation_products", "n_antennas": n_antennas,
              "n_chans": n_chans, "int_time": int_time, "n_substreams": 4},
        "sdp_l0": {"type": "sdp.vis", "src_streams": [cbf], "output_int_time": output_int_time,
                   "continuum_factor": 1, "archive": True},
        "cal": {"type": "sdp.cal", "src_streams": ["sdp_l0"]},
        "sdp_l0_cal_flags": {"type": "sdp.flags", "src_streams": ["sdp_l0", "cal"],
                             "archive": True},
    }
    if continuum_factor > 1:
        outputs["sdp_l0_continuum"] = {
            "type": "sdp.vis", "src_streams": [cbf], "output_int_time": output_int_time,
            "continuum_factor": continuum_factor, "archive": False}
    config = {"version": SCHEMA_VERSIONS[-1], "outputs": outputs,
              "simulation": {"script": script, **(simulation or {})}}
    if settings:
        config["config"] = settings
    return validate_config(config)
