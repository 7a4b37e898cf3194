"""Co-evolution rounds: GDUF on data that includes the previous generator's images, then DIGA against the new
frozen detector, repeated; generation sharded across ranks and every stage resumable."""
