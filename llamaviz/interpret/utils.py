"""TransformerLens' `utils` helpers that analysis code calls: get_act_name, test_prompt, to_numpy, get_device."""

from __future__ import annotations

import numpy as np
import torch

from llamaviz.llama.names import get_act_name

__all__ = ["get_act_name", "get_device", "test_prompt", "to_numpy"]


def to_numpy(tensor) -> np.ndarray:
    """A tensor (detached, on the CPU), array, list or number as a numpy array."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def get_device() -> torch.device:
    """cuda when present, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def test_prompt(prompt: str, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> list[tuple[str, int]]:
    """Print how the model ranks `answer` after `prompt`: rank, logit and probability of each answer token
    (teacher-forced), and the top-k at each step. Returns [(answer token, rank)]."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    results = []
    for text in answers:
        if prepend_space_to_answer and not text.startswith(" "):
            text = " " + text
        prompt_ids = model.to_tokens(prompt, prepend_bos=prepend_bos)
        answer_ids = model.to_tokens(text, prepend_bos=False)
        ids = torch.cat([prompt_ids, answer_ids], dim=1)
        with torch.no_grad():
            logits = model(ids, return_type="logits")[0].float()  # [p, v]
        start = prompt_ids.shape[1] - 1
        if print_details:
            print("Tokenized prompt:", model.to_str_tokens(prompt_ids))
            print("Tokenized answer:", model.to_str_tokens(answer_ids))
        for step, token in enumerate(answer_ids[0].tolist()):
            row = logits[start + step]
            probs = row.softmax(-1)
            rank = int((row > row[token]).sum())
            results.append((model.to_single_str_token(token), rank))
            if print_details:
                print(f"Performance on answer token:\nRank: {rank:<8} Logit: {row[token].item():5.2f} "
                      f"Prob: {probs[token].item():6.2%} Token: |{model.to_single_str_token(token)}|")
                values, top = row.topk(top_k)
                for k, (value, index) in enumerate(zip(values.tolist(), top.tolist())):
                    print(f"Top {k}th token. Logit: {value:5.2f} Prob: {probs[index].item():6.2%} "
                          f"Token: |{model.to_single_str_token(index)}|")
    if print_details:
        print(f"Ranks of the answer tokens: {results}")
    return results


test_prompt.__test__ = False  # not a pytest test, whatever its name
