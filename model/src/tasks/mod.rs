//! Task models built on the X-VLM core: pre-training now, fine-tuning tasks beside it.
