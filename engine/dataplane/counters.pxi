# cython: language_level=3
# The session counters as C indices (included by engine.pyx).  Every key the Python engine
# (engine/core/session.py, session_parts.py, table.py) can put in its Counter has one index;
# EC_NAMES[i] is that key.  The table owns one uint64_t[EC_COUNT] array shared by its sessions.

cdef enum:
    EC_ALL_CLT = 0  # 'all clt'
    EC_C_RESP = 1  # 'c-resp'
    EC_CLIENT_GAP = 2  # 'client gap'
    EC_CLIENT_GAP_ABANDONED = 3  # 'client gap abandoned'
    EC_CLIENT_GAP_RING_LOSS = 4  # 'client gap ring loss'
    EC_CLIENT_OVERLAP = 5  # 'client overlap'
    EC_CLIENT_BYTES_ACKED = 6  # 'client_bytes_acked'
    EC_CLIENT_BYTES_CAPTURED = 7  # 'client_bytes_captured'
    EC_CLIENT_TRUNCATED = 8  # 'client_truncated'
    EC_CLT_CONT = 9  # 'clt cont'
    EC_CONNS = 10  # 'conns'
    EC_FAST_RETRANSMIT = 11  # 'fast retransmit'
    EC_FIN = 12  # 'fin'
    EC_FOR_NO_SYN = 13  # 'for no syn'
    EC_OBS_DEL = 14  # 'obs del'
    EC_PORT_REUSE = 15  # 'port reuse'
    EC_RECONNECT = 16  # 'reconnect'
    EC_RECONNECT_REFUSED_BUDGET = 17  # 'reconnect_refused_budget'
    EC_RECONNECT_REFUSED_OFF = 18  # 'reconnect_refused_off'
    EC_RECONNECT_REFUSED_UNANSWERED = 19  # 'reconnect_refused_unanswered'
    EC_RECONNECT_SKIPPED_BYTES = 20  # 'reconnect_skipped_bytes'
    EC_RECV_PACKS_AFTER_RETRANSMISSION = 21  # 'recv packs after retransmission'
    EC_REL = 22  # 'rel'
    EC_REQUESTS = 23  # 'requests'
    EC_REQUESTS_HELD = 24  # 'requests_held'
    EC_RESET = 25  # 'reset'
    EC_RESP = 26  # 'resp'
    EC_RESP_FIN = 27  # 'resp fin'
    EC_RESP_RETRANSMITTED = 28  # 'resp retransmitted'
    EC_RESP_RST = 29  # 'resp rst'
    EC_RETRANSMIT = 30  # 'retransmit'
    EC_RTO = 31  # 'rto'
    EC_SEND = 32  # 'send'
    EC_SEND_ACK = 33  # 'send ack'
    EC_SEND_CONTENT = 34  # 'send content'
    EC_SEND_SYN = 35  # 'send syn'
    EC_SESSIONS_REFUSED = 36  # 'sessions refused'
    EC_SYN_CNT = 37  # 'syn cnt'
    EC_SYN_RETRANSMIT = 38  # 'syn retransmit'
    EC_TOTAL_CONT_RETRANSMIT = 39  # 'total cont retransmit'
    EC_TUPLE_HISTORY_AVOIDED = 40  # 'tuple_history_avoided'
    EC_TUPLES_REUSED = 41  # 'tuples_reused'
    EC_TUPLES_SPILLED = 42  # 'tuples_spilled'
    EC_TW = 43  # 'tw'
    EC_UNSEND_DROPPED = 44  # 'unsend dropped'
    EC_WINDOW_PROBE = 45  # 'window probe'
    EC_GATE_BYTES = 46  # 'gate_bytes'
    EC_GATE_NOWAIT = 47  # 'gate_nowait'
    EC_GATE_QUIET = 48  # 'gate_quiet'
    EC_GATE_MAX_WAIT = 49  # 'gate_max_wait'
    EC_DROP_NO_TRANSFER = 50  # 'drop_no_transfer'
    EC_DROP_SAMPLED_OUT = 51  # 'drop_sampled_out'
    EC_DROP_NO_SESSION = 52  # 'drop_no_session'
    EC_DROP_NO_SYN = 53  # 'drop_no_syn'
    EC_DROP_SESSION_LIMIT = 54  # 'drop_session_limit'
    EC_DROP_NO_TUPLE = 55  # 'drop_no_tuple'
    EC_DROP_CLIENT_SYN_ACK = 56  # 'drop_client_syn_ack'
    EC_DROP_UNKNOWN_RESPONSE = 57  # 'drop_unknown_response'
    EC_DROP_PURE_ACK = 58  # 'drop_pure_ack'
    EC_DROP_CLIENT_RETRANSMIT = 59  # 'drop_client_retransmit'
    EC_DROP_SYN_RETRANSMIT = 60  # 'drop_syn_retransmit'
    EC_DROP_SYN_CONFLICT = 61  # 'drop_syn_conflict'
    EC_DROP_OLD_SEGMENT = 62  # 'drop_old_segment'
    EC_DROP_AFTER_FIN = 63  # 'drop_after_fin'
    EC_DROP_SESSION_CLOSED = 64  # 'drop_session_closed'
    EC_DROP_UNEXPECTED_RESPONSE = 65  # 'drop_unexpected_response'
    EC_DROP_STRAY_RESPONSE = 66  # 'drop_stray_response'
    EC_DROP_BAD_ACK = 67  # 'drop_bad_ack'
    EC_DROP_OUT_OF_WINDOW = 68  # 'drop_out_of_window'
    EC_DROP_CLIENT_OUT_OF_WINDOW = 69  # 'drop_client_out_of_window'
    EC_DROP_INTERNAL_ERROR = 70  # 'drop_internal_error'
    EC_DROP_SHED = 71  # 'drop_shed'
    EC_ENDED_CLOSED = 72  # 'ended_closed'
    EC_ENDED_TARGET_CLOSED = 73  # 'ended_target_closed'
    EC_ENDED_TARGET_RESET = 74  # 'ended_target_reset'
    EC_ENDED_CLIENT_RESET = 75  # 'ended_client_reset'
    EC_ENDED_REFUSED = 76  # 'ended_refused'
    EC_ENDED_HANDSHAKE_TIMEOUT = 77  # 'ended_handshake_timeout'
    EC_ENDED_RETRANSMIT_LIMIT = 78  # 'ended_retransmit_limit'
    EC_ENDED_RECONNECT_LIMIT = 79  # 'ended_reconnect_limit'
    EC_ENDED_TIMEOUT = 80  # 'ended_timeout'
    EC_ENDED_IDLE = 81  # 'ended_idle'
    EC_ENDED_FIN_WAIT_TIMEOUT = 82  # 'ended_fin_wait_timeout'
    EC_ENDED_ABORTED = 83  # 'ended_aborted'
    EC_ENDED_OFFLINE_END = 84  # 'ended_offline_end'
    EC_ENDED_SHED_HALF_OPEN = 85  # 'ended_shed_half_open'
    EC_SHED_SESSIONS_MEMORY = 86  # 'shed_sessions_memory'
    EC_SHED_SESSIONS_BACKLOG = 87  # 'shed_sessions_backlog'
    EC_RESPONSE_DECODE_ERRORS = 88  # 'response_decode_errors'
    EC_COUNT = 89

# The Counter key of each index (Python side only: reading and converting the array).
EC_NAMES = (
    'all clt',
    'c-resp',
    'client gap',
    'client gap abandoned',
    'client gap ring loss',
    'client overlap',
    'client_bytes_acked',
    'client_bytes_captured',
    'client_truncated',
    'clt cont',
    'conns',
    'fast retransmit',
    'fin',
    'for no syn',
    'obs del',
    'port reuse',
    'reconnect',
    'reconnect_refused_budget',
    'reconnect_refused_off',
    'reconnect_refused_unanswered',
    'reconnect_skipped_bytes',
    'recv packs after retransmission',
    'rel',
    'requests',
    'requests_held',
    'reset',
    'resp',
    'resp fin',
    'resp retransmitted',
    'resp rst',
    'retransmit',
    'rto',
    'send',
    'send ack',
    'send content',
    'send syn',
    'sessions refused',
    'syn cnt',
    'syn retransmit',
    'total cont retransmit',
    'tuple_history_avoided',
    'tuples_reused',
    'tuples_spilled',
    'tw',
    'unsend dropped',
    'window probe',
    'gate_bytes',
    'gate_nowait',
    'gate_quiet',
    'gate_max_wait',
    'drop_no_transfer',
    'drop_sampled_out',
    'drop_no_session',
    'drop_no_syn',
    'drop_session_limit',
    'drop_no_tuple',
    'drop_client_syn_ack',
    'drop_unknown_response',
    'drop_pure_ack',
    'drop_client_retransmit',
    'drop_syn_retransmit',
    'drop_syn_conflict',
    'drop_old_segment',
    'drop_after_fin',
    'drop_session_closed',
    'drop_unexpected_response',
    'drop_stray_response',
    'drop_bad_ack',
    'drop_out_of_window',
    'drop_client_out_of_window',
    'drop_internal_error',
    'drop_shed',
    'ended_closed',
    'ended_target_closed',
    'ended_target_reset',
    'ended_client_reset',
    'ended_refused',
    'ended_handshake_timeout',
    'ended_retransmit_limit',
    'ended_reconnect_limit',
    'ended_timeout',
    'ended_idle',
    'ended_fin_wait_timeout',
    'ended_aborted',
    'ended_offline_end',
    'ended_shed_half_open',
    'shed_sessions_memory',
    'shed_sessions_backlog',
    'response_decode_errors',
)

