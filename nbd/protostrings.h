/* Names of NBD protocol values, for logs and error messages. */
#ifndef NBDS_PROTOSTRINGS_H
#define NBDS_PROTOSTRINGS_H

#include <stdint.h>

const char *nbds_opt_name(uint32_t option);
const char *nbds_rep_name(uint32_t reply);
const char *nbds_cmd_name(uint16_t type);
const char *nbds_err_name(uint32_t error);

#endif /* NBDS_PROTOSTRINGS_H */
