"""Regenerate examples/data/quickstart_chat.jsonl (the quickstart's dataset).

python examples/data/make_quickstart_data.py
"""

import json
from pathlib import Path

from steps.synthetic_chat import chat_rows

if __name__ == "__main__":
    target = Path(__file__).with_name("quickstart_chat.jsonl")
    target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chat_rows(seed=0)))
    print(f"wrote {target}")
