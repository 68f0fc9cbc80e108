"""The finetune flags of a BCI run (`--bci-data DIR` and the encoder's shape), and the defaults that
suit an encoder trained from scratch; merged into the finetune command's flag table."""

# finetune defaults that suit the encoder, trained from scratch (a flag or the YAML file still wins)
BCI_DEFAULTS = {'iters': 300, 'lr': 1e-3, 'batch-size': 8, 'warmup': 20, 'seq-len': 64, 'eval-every': 100,
                'targets': 'q,k,v,o'}

# flag -> (type, default, help), merged into recipes/options.FLAGS
BCI_FLAGS = {
    'bci-data': (str, None, 'BCI data folder (signals.npy + texts.jsonl): train the signal encoder head; '
                            'defaults then become ' + ' '.join(f'--{k} {v}' for k, v in BCI_DEFAULTS.items())),
    'bci-encoder': (str, None, 'start from the encoder saved in this folder (default: a new one)'),
    'bci-d-enc': (int, 128, 'BCI encoder width'),
    'bci-layers': (int, 2, 'BCI encoder transformer layers'),
    'bci-heads': (int, 4, 'BCI encoder attention heads'),
    'bci-ffn': (int, 0, 'BCI encoder feed-forward width (0: 4 x width)'),
    'bci-patch': (int, 8, 'samples per temporal patch (one prefix position each)'),
    'bci-stride': (int, 4, 'samples between patch starts (0: the patch length)'),
    'bci-dropout': (float, 0.1, 'dropout inside the BCI encoder'),
    'bci-prompt': (str, '', 'fixed text placed before the signal prefix'),
    'bci-decode-trials': (int, 8, 'validation trials decoded at each evaluation (0: none)'),
}
