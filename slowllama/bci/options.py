"""The flags of a BCI run (`--bci-data DIR` and the encoder's shape), and the defaults that suit an
encoder trained from scratch. Listed by `slowllama bci --help` as a group of their own; finetune
accepts them too (a --bci-data run is the same run) but leaves them out of its --help."""

# finetune defaults that suit the encoder, trained from scratch (a flag or the YAML file still wins)
BCI_DEFAULTS = {'iters': 300, 'lr': 1e-3, 'batch-size': 8, 'warmup': 20, 'seq-len': 64, 'eval-every': 100,
                'targets': 'q,k,v,o'}

# flag -> (type, default, help); recipes/options.py adds them to finetune's and the bci command's parsers
BCI_FLAGS = {
    'bci-data': (str, None, 'BCI data folder (signals.npy + texts.jsonl): train the signal encoder head; '
                            'defaults then become ' + ' '.join(f'--{k} {v}' for k, v in BCI_DEFAULTS.items())),
    'bci-encoder': (str, None, 'start from the encoder saved in this folder (default: a new one)'),
    'bci-d-enc': (int, 128, 'BCI encoder width'),
    'bci-layers': (int, 2, 'BCI encoder transformer layers'),
    'bci-heads': (int, 4, 'BCI encoder attention heads'),
    'bci-ffn': (int, 0, 'BCI encoder feed-forward width (0: 4 x width)'),
    'bci-stem': (str, 'conv', 'BCI encoder front end: conv (small kernels + pooling, no absolute positions) | '
                              'patch (strided patches + learned positions, the first encoder)'),
    'bci-kernel': (int, 5, 'samples per convolution kernel (stem conv)'),
    'bci-pool': (int, 2, 'average pooling after each convolution (stem conv)'),
    'bci-conv-layers': (int, 2, 'convolutions (stem conv); the prefix is time / pool ** layers long'),
    'bci-patch': (int, 8, 'samples per temporal patch, one prefix position each (stem patch)'),
    'bci-stride': (int, 4, 'samples between patch starts, 0: the patch length (stem patch)'),
    'bci-dropout': (float, 0.2, 'dropout inside the BCI encoder'),
    'bci-lr': (float, None, 'peak learning rate of the encoder (default: --lr); same schedule'),
    'bci-weight-decay': (float, 0.05, 'AdamW weight decay of the encoder'),
    'bci-pretrain': (int, 3000, 'steps of CTC pretraining of a new encoder alone (reading the words), before the '
                               'joint training: seconds, against minutes through the decoder (0: none)'),
    'bci-no-augment': (bool, False, 'train on the trials as recorded (augmentation is on by default)'),
    'bci-shift': (int, None, 'augmentation: largest random time shift, in samples (default: a 16th of a trial)'),
    'bci-stretch': (float, 0.1, 'augmentation: time stretched by a random factor in [1 - x, 1 + x]'),
    'bci-scale': (float, 0.2, 'augmentation: amplitude scaled by a random factor in [1 - x, 1 + x]'),
    'bci-noise': (float, 0.3, 'augmentation: Gaussian noise added to the z-scored signals (standard deviation)'),
    'bci-channel-drop': (float, 0.1, 'augmentation: probability of zeroing a channel of a trial'),
    'bci-prompt': (str, '', 'fixed text placed before the signal prefix'),
    'bci-decode-trials': (int, 64, 'validation trials decoded at each evaluation, scored by exact match and WER, '
                                   'the best kept as best/ (0: none)'),
}
