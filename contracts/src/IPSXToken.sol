// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title IPSX utility token
/// @notice Fixed-supply ERC20 (+ EIP-2612 permit) of the IP Sharing Exchange. The whole
/// supply is minted once, in the constructor, to the four allocation addresses of the
/// whitepaper; there is no mint function afterwards.
contract IPSXToken is ERC20, ERC20Permit {
    /// @notice 1,800,000,000 tokens with 18 decimals.
    uint256 public constant TOTAL_SUPPLY = 1_800_000_000 * 10 ** 18;
    /// @notice Share of funding participants: 50.0 % (basis points).
    uint256 public constant FUNDING_BPS = 5000;
    /// @notice Share of incentives and partners: 27.5 % (basis points).
    uint256 public constant INCENTIVES_BPS = 2750;
    /// @notice Share of the bounty programme: 2.5 % (basis points).
    uint256 public constant BOUNTY_BPS = 250;
    /// @notice Share of the team: 20.0 % (basis points).
    uint256 public constant TEAM_BPS = 2000;

    /// @notice An allocation address was the zero address; `index` is 0 funding,
    /// 1 incentives, 2 bounty, 3 team.
    error ZeroAllocationAddress(uint256 index);

    /// @param funding receives 50 % (funding participants)
    /// @param incentives receives 27.5 % (incentives and partners)
    /// @param bounty receives 2.5 % (bounty)
    /// @param team receives 20 % (team)
    constructor(address funding, address incentives, address bounty, address team)
        ERC20("IPSX", "IPSX")
        ERC20Permit("IPSX")
    {
        address[4] memory to = [funding, incentives, bounty, team];
        uint256[4] memory bps = [FUNDING_BPS, INCENTIVES_BPS, BOUNTY_BPS, TEAM_BPS];
        for (uint256 i = 0; i < 4; i++) {
            if (to[i] == address(0)) revert ZeroAllocationAddress(i);
            // The four shares divide the supply exactly (no rounding dust).
            _mint(to[i], (TOTAL_SUPPLY * bps[i]) / 10_000);
        }
        assert(totalSupply() == TOTAL_SUPPLY);
    }
}
