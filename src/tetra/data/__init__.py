"""Text in, tokens out: document sources and tokenizers.

Entry points: tetra.data.sources.iter_documents and tetra.data.tokenizer.TextTokenizer.
"""
