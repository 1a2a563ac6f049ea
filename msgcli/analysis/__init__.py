"""Figures and tables of the paper drawn from msgcli's own run and sweep directories.

``runs`` reads run/sweep directories, ``stats`` makes the ablation and mask-p
tables, ``figures`` draws Figs. 3-5, ``grads`` Fig. 1 and ``firing`` Fig. 6 with
the synaptic-operation and energy estimate; :mod:`msgcli.cli.analyze` is ``msgsnn analyze``.
"""
