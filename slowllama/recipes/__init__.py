"""The commands: each module is one (its flags, its setup, the loop around the components). A recipe
imports components and the modules the recipes share (options, inference, run_setup), never another
recipe."""
