// Shapes of the answers the OpenAPI document leaves open (`serde_json::Value`): conflicts and
// cursors. Field names are those of src/pull/resolve.rs and src/control/cursors/mod.rs.
export interface FieldConflict {
  field: string;
  column: string;
  source: unknown;
  target: unknown;
  policy: string;
  winner: string;
}

export interface Conflict {
  id: string;
  pipeline: string;
  table: string;
  key: string;
  list_id: string;
  item_id: string;
  fields: FieldConflict[];
  decision: string;
  at_ms: number;
  state: "open" | "resolved" | "superseded" | "decided";
  resolution?: { take: string; resolved_by?: string | null; at_ms: number };
  superseded_by?: string;
}

export interface PartitionCursor {
  topic: string;
  partition: number;
  committed?: number | null;
  start?: number;
  end?: number;
  lag?: number;
}

export interface GroupCursor {
  role: string;
  group: string;
  stage?: string | null;
  resettable?: boolean;
  partitions?: PartitionCursor[];
  lag?: number;
  error?: string;
}

export interface ListCursor {
  list: string;
  list_id: string;
  pulls: boolean;
  delta_link?: boolean;
  phase?: string;
  age_ms?: number;
  error?: string;
}

export interface Cursors {
  pipeline?: string;
  slot: Record<string, unknown>;
  groups: GroupCursor[];
  lists: ListCursor[];
}

export interface Whoami {
  name?: string | null;
  role: string;
  open: boolean;
}
