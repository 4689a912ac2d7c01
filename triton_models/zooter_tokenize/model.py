"""Triton python model `zooter_tokenize`: query text -> input_ids, attention_mask (, token_type_ids).

Uses zooter.runtime.tokenize.encode, the function the in-process Router uses, so a query is cleaned,
truncated and padded the same way here. Requests that Triton batches together are tokenized in one
call; each request gets back its own rows, padded to its own longest row. A bad row (empty text,
text over the byte limit, invalid UTF-8 is replaced, not refused) fails its request with a message
naming the row (INVALID_ARG: HTTP 400 through the zooter_route ensemble); the other requests of the
batch are unaffected.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.bundle import MANIFEST, Manifest
from zooter.runtime.tokenize import EmptyQueryError, clean_query, encode, load_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.max_length = Manifest.read_file(folder / MANIFEST).max_length
        self.tokenizer = load_tokenizer(folder / "tokenizer.json", self.max_length)
        self.outputs = [o["name"] for o in config["output"]]
        self.max_text_bytes = int(config["parameters"]["max_text_bytes"]["string_value"])

    def _check(self, rows):
        """Raises ValueError naming the first bad row of a request."""
        for i, raw in enumerate(rows):
            if len(raw) > self.max_text_bytes:
                raise ValueError(f"row {i}: text of {len(raw)} bytes is over the {self.max_text_bytes}-byte limit "
                                 f"(the router reads only the first {self.max_length} tokens; send less)")
            try:
                clean_query(raw)
            except EmptyQueryError:
                raise ValueError(f"row {i}: empty text: give the query to route") from None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, texts, counts = [], [], []
        for r, request in enumerate(requests):
            rows = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1).tolist()
            try:
                self._check(rows)
            except ValueError as err:
                E = pb_utils.TritonError       # the stub adds its classes to pb_utils after importing this file
                responses[r] = pb_utils.InferenceResponse(error=E(f"zooter_tokenize: {err}", E.INVALID_ARG))
                continue
            good.append(r)
            texts += rows
            counts.append(len(rows))
        if texts:
            batch = encode(self.tokenizer, texts)
            start = 0
            for r, n in zip(good, counts):
                rows = {k: v[start:start + n] for k, v in batch.items()}
                width = int(rows["attention_mask"].sum(axis=1).max())
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(rows[name][:, :width])) for name in self.outputs]
                responses[r] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses
