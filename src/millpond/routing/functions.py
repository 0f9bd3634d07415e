"""Built-in functions that may run on a replica.

A function call sends a statement to the primary unless its name is listed here (or
added by the user). The list holds PostgreSQL built-ins that neither change data nor
need a writable server: calling them on a hot standby works and changes nothing.
Left out on purpose, so they go to the primary:

- sequence functions (``nextval``, ``setval``, ``currval``, ``lastval``);
- anything that assigns a transaction id or reads the primary's WAL position
  (``txid_current``, ``pg_current_xact_id``, ``pg_current_wal_lsn``), which fail
  during recovery;
- session and server side effects: ``set_config``, ``setseed``, advisory locks,
  ``pg_notify``, ``pg_cancel_backend``, ``pg_terminate_backend``, ``pg_reload_conf``,
  large objects (``lo_*``), replication slots, statistics resets, ``dblink``.

Names are matched lower-cased; a call qualified with ``pg_catalog.`` is matched by its
bare name, any other schema only by ``schema.name``.
"""

from __future__ import annotations

_AGGREGATES = """
count sum avg min max array_agg string_agg bool_and bool_or every bit_and bit_or bit_xor
json_agg jsonb_agg json_agg_strict jsonb_agg_strict json_object_agg jsonb_object_agg
json_object_agg_strict jsonb_object_agg_strict json_object_agg_unique
jsonb_object_agg_unique json_object_agg_unique_strict jsonb_object_agg_unique_strict
json_arrayagg json_objectagg xmlagg any_value range_agg range_intersect_agg
stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop covar_samp
regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
mode percentile_cont percentile_disc grouping
"""

_WINDOW = """
row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
nth_value
"""

_MATH = """
abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale mod pi
power pow radians round scale sign sqrt trim_scale trunc width_bucket random random_normal
acos acosd asin asind atan atand atan2 atan2d cos cosd cot cotd sin sind tan tand sinh cosh
tanh asinh acosh atanh erf erfc gamma lgamma numeric_inc
"""

_STRINGS = """
ascii bit_length btrim char_length character_length chr concat concat_ws format initcap
left length lower lpad ltrim md5 normalize is_normalized octet_length overlay position
quote_ident quote_literal quote_nullable regexp_count regexp_instr regexp_like regexp_match
regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table regexp_substr
repeat replace reverse right rpad rtrim split_part starts_with string_to_array
string_to_table strpos substr substring to_ascii to_hex to_oct to_bin translate trim unistr
upper casefold encode decode convert convert_from convert_to sha224 sha256 sha384 sha512
crc32 crc32c get_bit get_byte set_bit set_byte bit_count parse_ident similar_to_escape
to_char to_date to_number to_timestamp format_type text textlen like_escape
"""

_TIME = """
age clock_timestamp date_add date_bin date_part date_subtract date_trunc extract isfinite
justify_days justify_hours justify_interval make_date make_interval make_time
make_timestamp make_timestamptz now statement_timestamp timeofday transaction_timestamp
timezone overlaps pg_sleep pg_sleep_for pg_sleep_until
"""

_JSON = """
to_json to_jsonb array_to_json row_to_json json_build_array jsonb_build_array
json_build_object jsonb_build_object json_object jsonb_object json_array_length
jsonb_array_length json_each jsonb_each json_each_text jsonb_each_text json_extract_path
jsonb_extract_path json_extract_path_text jsonb_extract_path_text json_object_keys
jsonb_object_keys json_populate_record jsonb_populate_record json_populate_recordset
jsonb_populate_recordset jsonb_populate_record_valid json_to_record jsonb_to_record
json_to_recordset jsonb_to_recordset json_strip_nulls jsonb_strip_nulls jsonb_set
jsonb_set_lax jsonb_insert jsonb_path_exists jsonb_path_match jsonb_path_query
jsonb_path_query_array jsonb_path_query_first jsonb_path_exists_tz jsonb_path_match_tz
jsonb_path_query_tz jsonb_path_query_array_tz jsonb_path_query_first_tz jsonb_pretty
json_typeof jsonb_typeof json_array_elements jsonb_array_elements json_array_elements_text
jsonb_array_elements_text json_scalar json_serialize json_array jsonb_concat
"""

_ARRAYS = """
array_append array_cat array_dims array_fill array_length array_lower array_ndims
array_position array_positions array_prepend array_remove array_replace array_reverse
array_sample array_shuffle array_sort array_to_string array_upper cardinality trim_array
unnest generate_series generate_subscripts
"""

_RANGES_GEO_NET = """
lower_inc upper_inc lower_inf upper_inf isempty range_merge multirange int4range int8range
numrange tsrange tstzrange daterange int4multirange int8multirange nummultirange
tsmultirange tstzmultirange datemultirange area center diameter height width radius
npoints point box circle line lseg path polygon isclosed isopen host hostmask masklen
netmask network broadcast abbrev family inet_merge inet_same_family set_masklen
"""

_TEXT_SEARCH_XML = """
to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank
ts_rank_cd ts_headline setweight strip numnode querytree ts_lexize ts_debug
array_to_tsvector tsvector_to_array xpath xpath_exists xml_is_well_formed
xml_is_well_formed_document xml_is_well_formed_content xmlconcat xmltext
"""

_CASTS = """
bool int2 int4 int8 float4 float8 numeric varchar bpchar date time timetz timestamp
timestamptz interval uuid inet cidr macaddr json jsonb bytea oid regclass
"""

_MISC = """
num_nulls num_nonnulls gen_random_uuid uuidv4 uuidv7 uuid_extract_timestamp
uuid_extract_version pg_typeof pg_column_size pg_column_compression pg_size_pretty
pg_size_bytes pg_relation_size pg_total_relation_size pg_table_size pg_indexes_size
pg_database_size pg_tablespace_size nullif coalesce greatest least
"""

_SYSTEM = """
current_database current_schema current_schemas current_setting current_user session_user
version inet_server_addr inet_server_port inet_client_addr inet_client_port
pg_backend_pid pg_postmaster_start_time pg_conf_load_time pg_is_in_recovery
pg_last_wal_replay_lsn pg_last_wal_receive_lsn pg_last_xact_replay_timestamp
pg_is_wal_replay_paused pg_get_wal_replay_pause_state pg_wal_lsn_diff pg_jit_available
has_table_privilege has_schema_privilege has_database_privilege has_column_privilege
has_any_column_privilege has_function_privilege has_sequence_privilege
has_tablespace_privilege has_type_privilege has_language_privilege
has_foreign_data_wrapper_privilege has_server_privilege has_parameter_privilege
pg_has_role row_security_active pg_get_viewdef pg_get_indexdef pg_get_constraintdef
pg_get_functiondef pg_get_function_arguments pg_get_function_result
pg_get_function_identity_arguments pg_get_triggerdef pg_get_ruledef pg_get_statisticsobjdef
pg_get_expr pg_get_userbyid pg_get_serial_sequence pg_get_keywords pg_get_partkeydef
pg_table_is_visible pg_type_is_visible pg_function_is_visible pg_opclass_is_visible
pg_operator_is_visible pg_collation_is_visible pg_ts_config_is_visible obj_description
col_description shobj_description to_regclass to_regtype to_regtypemod to_regproc
to_regprocedure to_regnamespace to_regrole to_regoper to_regoperator to_regcollation
pg_encoding_to_char pg_char_to_encoding pg_client_encoding pg_my_temp_schema
pg_is_other_temp_schema pg_collation_for pg_describe_object pg_identify_object
pg_input_is_valid pg_input_error_info pg_tablespace_location pg_relation_filenode
pg_relation_filepath pg_filenode_relation pg_options_to_table pg_get_object_address
pg_get_catalog_foreign_keys pg_blocking_pids pg_safe_snapshot_blocking_pids
pg_last_committed_xact pg_xact_commit_timestamp pg_stat_get_activity
pg_visible_in_snapshot pg_current_snapshot pg_snapshot_xmin pg_snapshot_xmax
pg_snapshot_xip pg_xact_status pg_trigger_depth
"""

#: The built-in allowlist (bare, lower-case names).
READ_ONLY_FUNCTIONS: frozenset[str] = frozenset(
    " ".join(
        (
            _AGGREGATES,
            _WINDOW,
            _MATH,
            _STRINGS,
            _TIME,
            _JSON,
            _ARRAYS,
            _RANGES_GEO_NET,
            _TEXT_SEARCH_XML,
            _CASTS,
            _MISC,
            _SYSTEM,
        )
    ).split()
)

#: Never read-only, whatever the user adds: they change data or session state, or
#: fail on a standby. Adding one of these to the allowlist is refused.
_WRITES = """
nextval setval currval lastval set_config setseed txid_current txid_current_if_assigned
pg_current_xact_id pg_current_xact_id_if_assigned pg_current_wal_lsn
pg_current_wal_insert_lsn pg_current_wal_flush_lsn pg_notify pg_advisory_lock
pg_advisory_lock_shared pg_advisory_xact_lock pg_advisory_xact_lock_shared
pg_try_advisory_lock pg_try_advisory_lock_shared pg_try_advisory_xact_lock
pg_try_advisory_xact_lock_shared pg_advisory_unlock pg_advisory_unlock_shared
pg_advisory_unlock_all
"""

WRITE_FUNCTIONS: frozenset[str] = frozenset(_WRITES.split())


def normalize_name(name: str) -> str:
    """How a user-given function name is stored: lower-case, ``pg_catalog.`` dropped."""
    name = name.strip().lower()
    if name.startswith("pg_catalog."):
        name = name[len("pg_catalog.") :]
    return name
