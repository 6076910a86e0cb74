"""The federation as processes: the launcher behind `teefl run` (one aggregator and N
collaborators, native, under Gramine, in network namespaces), its stop signals, the end-of-run
report and the throwaway PKI of a quick run."""
