"""ROPIM bench: ROPIM vs. MAE and SimMIM under identical budgets.

Nothing downloads at run time: the Hugging Face Hub is put offline here, before timm,
transformers or huggingface_hub can read their settings (they read HF_HUB_OFFLINE once, at
import). Set HF_HUB_OFFLINE=0 in the environment to allow downloads.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
