"""The BCI head: neural recordings -> prefix embeddings for the decoder (encoder.py), their data
(data.py), a synthetic set (synthetic.py), decoding and scores (decode.py), the training recipe
(train.py) and the bci_decode / bci_demo commands (commands.py)."""
