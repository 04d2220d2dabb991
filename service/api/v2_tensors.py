"""The Open Inference Protocol's tensors (``/v2``): datatypes, JSON ``data`` and the binary
tensor extension, parsed from and written to raw bytes. No routes and no sessions here.

A request body is a JSON object, optionally followed by raw tensor bytes: then the header
``Inference-Header-Content-Length`` gives the JSON's length, and each input that is sent as
bytes says how many in ``parameters.binary_data_size`` (in input order, little-endian,
row-major; BOOL is one byte per element). Replies mirror this for the outputs asked for in
binary (``parameters.binary_data`` per output, or ``binary_data_output`` for all).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput, InvalidJson, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_MEDIA_TYPE = "application/json"
BINARY_MEDIA_TYPE = "application/octet-stream"

# The protocol's datatypes and their numpy dtypes (BYTES and BF16 are not served by any model here).
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype)
    for name, dtype in (
        ("BOOL", np.bool_),
        ("UINT8", np.uint8),
        ("UINT16", np.uint16),
        ("UINT32", np.uint32),
        ("UINT64", np.uint64),
        ("INT8", np.int8),
        ("INT16", np.int16),
        ("INT32", np.int32),
        ("INT64", np.int64),
        ("FP16", np.float16),
        ("FP32", np.float32),
        ("FP64", np.float64),
    )
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's name of a numpy dtype (``float32`` → ``FP32``)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray  # shaped as the request's ``shape``


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: as ``binary_data_output`` says


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output of the model
    binary_output: bool  # the request's ``binary_data_output``


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding`` (gzip or deflate, as tritonclient offers),
    never more than ``limit`` bytes of it."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes (setting max_body_bytes)")
    return out


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request from its raw body and ``Inference-Header-Content-Length``."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} must be a byte count within the body's {len(body)} bytes")
        head, rest = body[:size], body[size:]
    if not head:
        raise InvalidJson("the inference request is empty; send a JSON object with 'inputs'")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        hint = " (JSON has no NaN or Infinity; send such values as binary data)" if b"NaN" in head else ""
        raise InvalidJson(f"the inference request is not valid JSON: {e}{hint}") from None
    if not isinstance(request, dict):
        raise InvalidInput("the inference request must be a JSON object with 'inputs'")
    parameters = _object(request.get("parameters"), "request 'parameters'")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of {name, shape, datatype, data}")
    reader = _Bytes(rest)
    inputs = [_input(item, i, reader) for i, item in enumerate(raw_inputs)]
    if reader.left:
        raise InvalidInput(f"{reader.left} bytes of binary data follow the inputs that no input claims")
    _unique([t.name for t in inputs], "input")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput("parameter 'binary_data_output' must be true or false")
    outputs = None
    if request.get("outputs") is not None:
        outputs = _outputs(request["outputs"])
    return InferRequest(request_id, parameters, inputs, outputs, binary_output)


class _Bytes:
    """The binary part of a body, read in input order."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, name: str) -> bytes:
        if size > self.left:
            raise InvalidInput(f"input {name!r}: binary_data_size {size} exceeds the {self.left} bytes left")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _unique(names: list[str], what: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise InvalidInput(f"{what} {sorted(seen)[0]!r} is named more than once")


def _input(item: object, index: int, reader: _Bytes) -> InputTensor:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput(f"inputs[{index}] must be an object with a string 'name'")
    name: str = item["name"]
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not one of {sorted(DATATYPES)}")
    dtype = DATATYPES[datatype]
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    count = int(np.prod(shape, dtype=np.int64))
    size = _object(item.get("parameters"), f"input {name!r} 'parameters'").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in item:
            raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size; send one")
        if size != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: binary_data_size is {size} bytes; shape {shape} of {datatype} needs "
                f"{count * dtype.itemsize}"
            )
        array = _from_bytes(reader.take(size, name), dtype)
    elif "data" in item:
        array = _from_json(item["data"], name, datatype, count)
    else:
        raise InvalidInput(f"input {name!r} has no 'data' (and no binary_data_size)")
    return InputTensor(name, datatype, array.reshape(shape))


def _from_bytes(raw: bytes, dtype: np.dtype[Any]) -> np.ndarray:
    if dtype.kind == "b":
        flags: np.ndarray = np.frombuffer(raw, dtype=np.uint8) != 0
        return flags
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_json(data: object, name: str, datatype: str, count: int) -> np.ndarray:
    """JSON ``data``: row-major, flat (or nested; only the element count must match)."""
    dtype = DATATYPES[datatype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        array = np.empty(0, dtype=object)
    kinds = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if array.dtype == object or (array.size and array.dtype.kind not in kinds):
        raise InvalidInput(f"input {name!r}: 'data' must be a flat list of {datatype} values")
    if array.size != count:
        raise InvalidInput(f"input {name!r}: 'data' has {array.size} elements; its shape needs {count}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input {name!r}: a value of 'data' is out of the range of {datatype}")
    return array.astype(dtype).ravel()


def _outputs(value: object) -> list[RequestedOutput]:
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of {name, parameters}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
        binary = _object(item.get("parameters"), f"output {item['name']!r} 'parameters'").get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output {item['name']!r}: binary_data must be true or false")
        out.append(RequestedOutput(item["name"], binary))
    _unique([o.name for o in out], "output")
    return out


def encode_reply(head: dict[str, Any], outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """The reply's body and headers: ``head`` (model name, version, id, parameters) plus one
    entry per ``(name, array, binary)``; binary outputs follow the JSON as raw bytes."""
    entries, blobs = [], []
    for name, array, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            raw = _to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()
        entries.append(entry)
    body = orjson.dumps({**head, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return body, {"Content-Type": JSON_MEDIA_TYPE}
    return b"".join([body, *blobs]), {"Content-Type": BINARY_MEDIA_TYPE, HEADER_LENGTH: str(len(body))}


def _to_bytes(array: np.ndarray) -> bytes:
    if array.dtype.kind == "b":
        return np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
